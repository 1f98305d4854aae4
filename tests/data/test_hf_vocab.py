"""hf_vocab.HFTokenizerVocabulary on SmolLM2's tokenizer (rebuilt from the shipped GGUF) vs the `tokenizers` library."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tokenizers

from hephaestus_jax import inference
from hephaestus_jax.config import ConfigError, ModelConfig
from hephaestus_jax.convert import gguf_tokenizer
from hephaestus_jax.data import vocab as vocab_lib
from hephaestus_jax.data.hf_vocab import HFTokenizerVocabulary
from support.smollm2_files import smollm2_gguf, smollm2_hf_dir, smollm2_tokenizer_dir  # noqa: F401 (fixtures)

TEXTS = [
    "Hello world  123456 3.14",
    "naïve café — “quoted” Ωmega straße 日本語のテキスト 한국어 🎉👩‍👩‍👧‍👦 🇺🇸",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}\n\telse:\r\n\t\tpass\n",
    "a" + " " * 97 + "b\n\n\n   \t\n" + " " * 300 + "end",
    "I'M sure WE'LL see they'd've done it",
    "The doc says <|im_end|> ends a turn; <|im_start|>assistant\n<|endoftext|><file_sep>",
]


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir):  # noqa: F811
    return vocab_lib.load_vocabulary(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def reference(smollm2_tokenizer_dir):  # noqa: F811
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(smollm2_tokenizer_dir, "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def test_non_llama3_tokenizer_json_loads_as_hf_vocabulary(smol):
    assert isinstance(smol, HFTokenizerVocabulary)
    assert smol.vocab_size == 49152
    assert isinstance(vocab_lib.load_vocabulary(os.path.dirname(vocab_lib.default_tokenizer_path())),
                      vocab_lib.Llama3Vocabulary)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tokenizers_and_round_trip(smol, reference, text):
    ids = smol.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert smol.decode(ids) == text


def test_special_token_strings_in_data_stay_text(smol):
    ids = smol.encode(TEXTS[-1])
    assert not set(ids) & set(smol.special_tokens.values())
    assert smol.special_id("<|im_end|>") == 2


def test_single_digits_and_whitespace_runs(smol):
    """SmolLM's pre-tokenizer splits digits off first, so the two spaces before them stay one token ("ĠĠ", 256);
    GPT-2's regex alone (what transformers builds in memory from the GGUF) gives [216, 216] there."""
    assert smol.encode("Hello world  123") == [19556, 905, 256, 33, 34, 35]


def test_bos_eos_pad_from_the_checkpoint_files(smol, smollm2_tokenizer_dir, tmp_path):  # noqa: F811
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.stop_ids, smol.prefix_ids) == (1, 2, 2, (2,), ())
    shutil.copy(os.path.join(smollm2_tokenizer_dir, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>", "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    other = vocab_lib.load_vocabulary(tmp_path)
    assert (other.bos_id, other.eos_id, other.stop_ids, other.prefix_ids, other.pad_id) == (0, 2, (2, 0), (0,), 2)
    assert pickle.loads(pickle.dumps(other)) == other


def test_config_token_missing_from_vocabulary_is_named(smollm2_tokenizer_dir, tmp_path):  # noqa: F811
    shutil.copy(os.path.join(smollm2_tokenizer_dir, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        vocab_lib.load_vocabulary(tmp_path)


def test_vocabulary_larger_than_the_embeddings_is_a_clear_error(smol):
    small = ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=32)
    with pytest.raises(ConfigError, match="49152 tokens but the checkpoint's model has vocab_size=32000"):
        inference.check_vocabulary(smol, small)
    padded = ModelConfig(vocab_size=49152, vocab_pad_multiple=128, hidden_size=64, intermediate_size=128,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32)
    inference.check_vocabulary(smol, padded)


def test_seqio_encode_tf_matches_python(smol):
    import tensorflow as tf

    text = TEXTS[1]
    np.testing.assert_array_equal(smol.encode_tf(tf.constant(text)).numpy(), smol.encode(text))


class _FakeReader:
    def __init__(self, **fields):
        self.fields = {name: _Field(value) for name, value in fields.items()}


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def test_gguf_with_another_tokenizer_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x.gguf: tokenizer.ggml.model is 'llama'; only byte-level BPE"):
        gguf_tokenizer.tokenizer_files(_FakeReader(**{"tokenizer.ggml.model": "llama"}), "x.gguf")
    with pytest.raises(ValueError, match=r"x.gguf: tokenizer.ggml.pre 'qwen9' is not supported"):
        gguf_tokenizer.tokenizer_files(
            _FakeReader(**{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen9"}), "x.gguf")


def test_rebuilt_tokenizer_equals_transformers_own_gguf_tokenizer(smol):
    """An independent reading of the same GGUF: transformers' GGUF tokenizer (in memory, before the broken
    save_pretrained) parses the vocabulary, merges and control tokens itself. Its pre-tokenizer is GPT-2's regex
    without SmolLM's single-digit split, so the texts leave digits out; the digit rule has its own test above."""
    import transformers

    gguf_path = smollm2_gguf()
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                           gguf_file=os.path.basename(gguf_path))
    texts = [text.translate(str.maketrans("", "", "0123456789")) for text in TEXTS]
    for text in texts:
        expected = reference(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert smol.encode(text) == expected, text
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [reference.convert_tokens_to_ids(t) for t in specials] == [smol.special_id(t) for t in specials]


def test_transformers_reads_the_ggufs_bos_eos_and_pad_from_the_rebuilt_files(smollm2_tokenizer_dir):  # noqa: F811
    """Our loader takes EOS from generation_config.json first; transformers users read tokenizer_config.json.
    The reference is the GGUF metadata as `gguf` reads it (transformers 5.3's own GGUF tokenizer names
    <|im_start|> as EOS, so it cannot be one here)."""
    import gguf
    import transformers

    reader = gguf.GGUFReader(smollm2_gguf())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    expected = {name: int(reader.fields[f"tokenizer.ggml.{name}_token_id"].contents())
                for name in ("bos", "eos", "padding")}
    rebuilt = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id, rebuilt.pad_token_id) == \
        (expected["bos"], expected["eos"], expected["padding"])
    assert (rebuilt.bos_token, rebuilt.eos_token) == (tokens[expected["bos"]], tokens[expected["eos"]]) == \
        ("<|im_start|>", "<|im_end|>")  # SmolLM2-Instruct ends an assistant turn with <|im_end|>.
