"""The chat-format registry and the `chatml` fallback (Hermes-style tools) on SmolLM2's own tokenizer and template."""

import json
import os

import numpy as np
import pytest
import tokenizers

from hephaestus_jax.data import chat_format, chat_text, forge
from hephaestus_jax.data import vocab as vocab_lib
from hephaestus_jax.data.chat_format import render_chat_prompt, render_document
from hephaestus_jax.data.forge import ToolCall
from hephaestus_jax.eval.tool_calls import parse_tool_calls
from support.smollm2_files import smollm2_hf_dir, smollm2_tokenizer_dir  # noqa: F401 (fixtures)

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir):  # noqa: F811
    return vocab_lib.load_vocabulary(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def chatml(smol):
    """SmolLM2's tokenizer with the `chatml` fallback named (its own template is tests/data/test_chat_template.py's)."""
    return chat_format.resolve_chat_format(smol, "chatml")


@pytest.fixture(scope="module")
def smol_template(smollm2_tokenizer_dir):  # noqa: F811
    """SmolLM2's own tokenizer with the chat template from its GGUF, as transformers applies it."""
    transformers = pytest.importorskip("transformers")
    with open(os.path.join(smollm2_tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    assert "<|im_start|>" in template
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(smollm2_tokenizer_dir, "tokenizer.json"), eos_token="<|im_end|>")
    tokenizer.chat_template = template
    return tokenizer


def sft(messages, tools=()):
    return forge.parse_record({"messages": messages, "tools": list(tools)}, "sft", "test.jsonl:1")


PLAIN_CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "system", "content": "Be nice.\n"}, {"role": "user", "content": "Hi  there 123 😀"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "def f(x):\n    pass\n"}],
]


@pytest.mark.parametrize("messages", PLAIN_CHATS)
def test_plain_chat_prompt_matches_smollm2_template_token_for_token(chatml, smol_template, messages):
    expected = smol_template.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False)
    got = render_chat_prompt([forge.Message(m["role"], m["content"]) for m in messages], (), chatml)
    assert got.tolist() == list(expected)


def test_format_is_detected_from_the_tokenizer(smol):
    llama = vocab_lib.load_vocabulary(vocab_lib.default_tokenizer_path())
    assert chat_format.resolve_chat_format(smol, "chatml").name == "chatml"
    assert chat_format.resolve_chat_format(llama).name == "llama3"  # no chat template ships with it
    assert chat_format.resolve_chat_format(smol).name == "template"  # SmolLM2 ships its own


def test_format_mismatch_names_the_missing_tokens(smol):
    with pytest.raises(ValueError, match=r"chat format 'llama3' needs the special tokens \['<\|start_header_id\|>', "
                                         r"'<\|end_header_id\|>', '<\|eot_id\|>'"):
        render_chat_prompt([forge.Message("user", "hi")], (), chat_format.resolve_chat_format(smol, "llama3"))
    llama = vocab_lib.load_vocabulary(vocab_lib.default_tokenizer_path())
    with pytest.raises(ValueError, match=r"'chatml' needs the special tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        render_document(sft([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
                        chat_format.resolve_chat_format(llama, "chatml"))
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        chat_format.resolve_chat_format(smol, "vicuna")


def test_sft_mask_is_assistant_content_and_im_end_never_headers(smol, chatml):
    record = sft([{"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"name": "get_weather", "arguments": {"city": "Oslo"}}]},
                  {"role": "ipython", "content": {"temp": 3}},
                  {"role": "assistant", "content": "It is 3 degrees."}], [WEATHER])
    example = render_document(record, chatml)
    im_end = smol.special_id("<|im_end|>")
    targets = example.tokens[example.loss_mask == 1]
    assert targets.tolist().count(im_end) == 2
    # Each target span ends with <|im_end|> (also SmolLM2's EOS and pad, which decode stops at / drops).
    ends = np.flatnonzero(targets == im_end)
    assert ends[-1] == len(targets) - 1
    spans = [smol.decode(piece.tolist()) for piece in np.split(targets, ends[:-1] + 1)]
    assert spans == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
                     "It is 3 degrees."]
    header_ids = smol.encode("assistant\n")
    starts = np.flatnonzero(example.tokens == smol.special_id("<|im_start|>"))
    for start in starts:
        assert not example.loss_mask[start: start + 1 + len(header_ids)].any()
    full = tokenizers.Tokenizer.from_file(smol.path).decode(example.tokens.tolist(), skip_special_tokens=False)
    assert "<|im_start|>tool\n<tool_response>\n{\"temp\": 3}\n</tool_response>" in full
    assert "<tools>\n" + json.dumps(chat_text.tool_schema(forge.parse_record(WEATHER, "tool_docs", "w")),
                                    ensure_ascii=False) + "\n</tools>" in full


def test_trajectory_and_documents_in_chatml(smol, chatml):
    doc = render_document(forge.TextDocument("hello world"), chatml)
    assert doc.tokens.tolist() == [*smol.encode("hello world"), smol.eos_id]


def test_parsers_read_chatml_tool_calls(smol):
    calls = [ToolCall("get_weather", {"city": "Oslo"}), ToolCall("get_weather", {"city": "Rome"})]
    text = chat_text.render_chatml_tool_calls(calls) + "<|im_end|>"
    assert parse_tool_calls(text) == calls
    assert parse_tool_calls("Sure: " + text) is None
    assert parse_tool_calls("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}") is None
