"""The checkpoint's own chat template (data/chat_template.py) against transformers' `apply_chat_template`: SmolLM2's
template, Meta's Llama-3.1 template and a template with tools; loss masks against transformers' assistant masks."""

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers

from conftest import REPO_ROOT
from hephaestus_jax.config import CHAT_FORMAT_NAMES
from hephaestus_jax.data import chat_format, forge
from hephaestus_jax.data import vocab as vocab_lib
from hephaestus_jax.data.chat_format import render_chat_prompt, render_document, resolve_chat_format
from hephaestus_jax.data.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from hephaestus_jax.data.forge import ForgeFormatError
from support.smollm2_files import smollm2_hf_dir, smollm2_tokenizer_dir  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")

TEMPLATES = os.path.join(REPO_ROOT, "tests", "fixtures", "chat_templates")
WEATHER = {"name": "get_weather", "description": "Current weather in a city — météo.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city"]}}
WEATHER_HF = {"type": "function", "function": WEATHER}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "Hi  there 123 😀"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "def f(x):\n    pass\n"},
     {"role": "assistant", "content": "def f(x):\n    return x"}],
]
TOOL_CHAT = [
    {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Zürich"}},
                                                        {"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    {"role": "ipython", "content": {"temp": 21, "sky": "clear ☀"}}, {"role": "ipython", "content": "3 degrees"},
    {"role": "assistant", "content": "21 degrees in Zürich, 3 in Oslo."},
]


def sft(messages, tools=()):
    return forge.parse_record({"messages": messages, "tools": list(tools)}, "sft", "test.jsonl:7")


def hf_messages(messages):
    """The Forge chat as transformers users write it (what TemplateRenderer gives the template)."""
    out = []
    for message in messages:
        if message["role"] == "ipython":
            content = message["content"]
            out.append({"role": "tool", "content": content if isinstance(content, str)
                        else json.dumps(content, ensure_ascii=False)})
        elif message.get("tool_calls"):
            out.append({"role": "assistant", "content": message["content"], "tool_calls": [
                {"type": "function", "function": call} for call in message["tool_calls"]]})
        else:
            out.append(message)
    return out


def with_template(tokenizer_dir, target, template_file=None, source=None):
    """A copy of a tokenizer directory whose chat template is `template_file` (chat_template.jinja)."""
    shutil.copytree(tokenizer_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
    if template_file or source:
        source = source or open(os.path.join(TEMPLATES, template_file), encoding="utf-8").read()
        with open(os.path.join(target, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(source)
    return str(target)


def reference(directory):
    return transformers.AutoTokenizer.from_pretrained(directory)


def spans(vocab, tokens, mask):
    """Decoded text of each maximal run of mask == 1, special tokens included."""
    decoder = tokenizers.Tokenizer.from_file(vocab.path)
    out, start = [], None
    for index, on in enumerate([*np.asarray(mask).tolist(), 0]):
        if on and start is None:
            start = index
        elif not on and start is not None:
            out.append(decoder.decode(np.asarray(tokens)[start:index].tolist(), skip_special_tokens=False))
            start = None
    return out


# ---- SmolLM2: its own template, which has no tools ----------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir(smollm2_tokenizer_dir, tmp_path_factory):  # noqa: F811
    return with_template(smollm2_tokenizer_dir, tmp_path_factory.mktemp("smol") / "tok")


@pytest.fixture(scope="module")
def smol(smol_dir):
    return vocab_lib.load_vocabulary(smol_dir)


def test_the_shipped_template_is_the_default_and_fallbacks_stay_by_name(smol):
    assert chat_format.resolve_chat_format(smol).name == "template"
    assert chat_format.resolve_chat_format(smol, "chatml").name == "chatml"
    llama = vocab_lib.load_vocabulary(vocab_lib.default_tokenizer_path())  # ships no template
    assert chat_format.resolve_chat_format(llama).name == "llama3"
    with pytest.raises(ValueError, match="ships no chat template"):
        chat_format.resolve_chat_format(llama, "template")
    assert set(CHAT_FORMAT_NAMES) == {chat_format.TEMPLATE, *chat_format.CHAT_FORMATS}  # what the CLIs offer


@pytest.mark.parametrize("messages", CHATS)
def test_prompts_and_sft_tokens_equal_transformers_apply_chat_template(smol, smol_dir, messages):
    hf = reference(smol_dir)
    for end in range(1, len(messages) + 1):
        if messages[end - 1]["role"] != "user":
            continue
        expected = hf.apply_chat_template(messages[:end], tokenize=True, add_generation_prompt=True, return_dict=False)
        prompt = [forge.Message(m["role"], m["content"]) for m in messages[:end]]
        ours = render_chat_prompt(prompt, (), resolve_chat_format(smol))
        assert ours.tolist() == list(expected)
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert render_document(sft(messages), resolve_chat_format(smol)).tokens.tolist() == list(expected)


def marked(source):
    """SmolLM2's template with `{% generation %}` around each assistant message's content and `<|im_end|>`."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in source
    return source.replace(plain, "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
                                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{'\n'}}"
                                 "{% else %}" + plain + "{% endif %}")


@pytest.mark.parametrize("messages", CHATS)
def test_sft_mask_equals_transformers_assistant_mask(smol, smol_dir, tmp_path, messages):
    """Rendering turn by turn (SmolLM2's template has no generation blocks) and the template's own generation
    blocks both give the mask transformers returns for the marked template."""
    source = load_chat_template(smol_dir).source
    marked_dir = with_template(smol_dir, tmp_path / "marked", source=marked(source))
    expected = reference(marked_dir).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                         return_assistant_tokens_mask=True)
    assert sum(expected["assistant_masks"]) > 0
    for vocab in (smol, vocab_lib.load_vocabulary(marked_dir)):
        example = render_document(sft(messages), resolve_chat_format(vocab))
        assert example.tokens.tolist() == expected["input_ids"]
        assert example.loss_mask.tolist() == expected["assistant_masks"]
    assert spans(smol, example.tokens, example.loss_mask) == [
        m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_a_template_without_tools_gets_them_as_chatml_text(smol):
    """SmolLM2's template ignores `tools` and `tool_calls`: they go into the messages in the Hermes convention,
    which renders exactly as the `chatml` fallback (tokens and mask)."""
    record = sft(TOOL_CHAT, [WEATHER])
    template, chatml = resolve_chat_format(smol), resolve_chat_format(smol, "chatml")
    ours, fallback = render_document(record, template), render_document(record, chatml)
    assert ours.tokens.tolist() == fallback.tokens.tolist()
    assert ours.loss_mask.tolist() == fallback.loss_mask.tolist()
    prompt = record.messages[:2]
    assert render_chat_prompt(prompt, record.tools, template).tolist() == render_chat_prompt(
        prompt, record.tools, chatml).tolist()
    # Without a system message and tools, the template adds its own default system prompt; the fallback does not.
    plain = [forge.Message("user", "Hi")]
    assert "named SmolLM" in smol.decode(render_chat_prompt(plain, (), template).tolist())
    assert "named SmolLM" not in smol.decode(render_chat_prompt(plain, (), chatml).tolist())


# ---- a template that renders tools itself -----------------------------------------------------------------------


def test_a_template_with_tools_renders_schemas_calls_and_results_as_transformers(smol_dir, tmp_path):
    tools_dir = with_template(smol_dir, tmp_path / "tools", "hermes_tools.jinja")
    vocab, hf = vocab_lib.load_vocabulary(tools_dir), reference(tools_dir)
    record = sft(TOOL_CHAT, [WEATHER])
    expected = hf.apply_chat_template(hf_messages(TOOL_CHAT), tools=[WEATHER_HF], tokenize=True, return_dict=False)
    example = render_document(record, resolve_chat_format(vocab))
    assert example.tokens.tolist() == list(expected)
    assert spans(vocab, example.tokens, example.loss_mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "21 degrees in Zürich, 3 in Oslo.<|im_end|>"]
    prompt = hf.apply_chat_template(hf_messages(TOOL_CHAT[:2]), tools=[WEATHER_HF], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
    assert render_chat_prompt(record.messages[:2], record.tools, resolve_chat_format(vocab)).tolist() == list(prompt)


# ---- Meta's Llama-3.1 template: the same tokens and masks as the llama3 fallback ----------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama31")
    shutil.copy(vocab_lib.default_tokenizer_path(), directory / "tokenizer.json")
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>",
                   "chat_template": open(os.path.join(TEMPLATES, "llama31.jinja"), encoding="utf-8").read()}, f)
    return str(directory)


@pytest.mark.parametrize("messages", CHATS)
def test_llama31_template_equals_transformers_and_the_llama3_fallback(llama_dir, messages):
    vocab, hf = vocab_lib.load_vocabulary(llama_dir), reference(llama_dir)
    template, fallback = resolve_chat_format(vocab), resolve_chat_format(vocab, "llama3")
    ours, fallback = render_document(sft(messages), template), render_document(sft(messages), fallback)
    assert ours.tokens.tolist() == list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert ours.tokens.tolist() == fallback.tokens.tolist()
    assert ours.loss_mask.tolist() == fallback.loss_mask.tolist()
    assert spans(vocab, ours.tokens, ours.loss_mask) == [
        m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]


def test_llama31_template_tool_call_and_its_mask(llama_dir):
    vocab, hf = vocab_lib.load_vocabulary(llama_dir), reference(llama_dir)
    messages = [{"role": "user", "content": "Weather in Zürich?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}]},
                {"role": "ipython", "content": "21 degrees"}, {"role": "assistant", "content": "21 degrees."}]
    example = render_document(sft(messages, [WEATHER]), resolve_chat_format(vocab))
    expected = hf.apply_chat_template(hf_messages(messages), tools=[WEATHER_HF], tokenize=True, return_dict=False)
    assert example.tokens.tolist() == list(expected)
    assert spans(vocab, example.tokens, example.loss_mask) == [
        '{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "c"}}<|eot_id|>', "21 degrees.<|eot_id|>"]


# ---- errors -------------------------------------------------------------------------------------------------------


def test_a_template_that_raises_names_the_record(llama_dir):
    """Meta's template takes one call per message: a parallel call is that template's error, naming the record."""
    vocab = vocab_lib.load_vocabulary(llama_dir)
    with pytest.raises(ForgeFormatError, match=r"test\.jsonl:7.*only supports single tool-calls"):
        render_document(sft(TOOL_CHAT, [WEATHER]), resolve_chat_format(vocab))


def test_a_template_that_rewrites_earlier_turns_needs_generation_blocks(smol_dir, tmp_path):
    source = "{{ messages | length }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    vocab = vocab_lib.load_vocabulary(with_template(smol_dir, tmp_path / "odd", source=source))
    with pytest.raises(ForgeFormatError, match=r"differently once it goes on.*\{% generation %\}"):
        render_document(sft(CHATS[0]), resolve_chat_format(vocab))


def test_template_syntax_errors_name_the_line_and_the_clock_is_fixed():
    with pytest.raises(ChatTemplateError, match="line 2"):
        ChatTemplate("ok\n{% if %}", "t.jinja").render([])
    assert ChatTemplate("{{ strftime_now('%d %b %Y') }}", "t").render([])[0] == "26 Jul 2024"
