"""KV-cache generation: parity with transformers' generate and with uncached forward passes, padding, sampling,
stop tokens, sharding, compile reuse, tool documents and the CLI."""

import json

import jax
import numpy as np
import pytest
import torch

from support.hf_reference import LLAMA31_SCALING, TINY_HF, hf_logits, hf_model, params_for
from hephaestus_jax import decoding, generate
from hephaestus_jax import inference as gen
from hephaestus_jax import sharding
from hephaestus_jax.config import MeshConfig, ModelConfig
from hephaestus_jax.eval import tool_docs
from hephaestus_jax.model import llama

HF_CONFIG = dict(TINY_HF, rope_scaling=LLAMA31_SCALING)  # Decoding runs past original_max_position_embeddings.
MISTRAL = dict(TINY_HF, model_type="mistral", sliding_window=12, rope_theta=10000.0)
STOP_FREE = range(3, 300)  # Prompt tokens avoid bos (1) and eos (2).
MAX_NEW = 32
TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    return hf_model(HF_CONFIG)


@pytest.fixture(scope="module")
def model(hf):
    """Our config (vocabulary padded 300 -> 320: padding must never be chosen) and params."""
    config = ModelConfig.from_hf(HF_CONFIG, vocab_pad_multiple=64)
    return config, params_for(hf, config)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(STOP_FREE.start, STOP_FREE.stop, n).astype(np.int32) for n in (5, 13, 9)]


def _padded(prompts, side):
    length = max(p.size for p in prompts)
    tokens, mask = np.zeros((len(prompts), length), np.int32), np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        columns = slice(length - p.size, length) if side == "left" else slice(0, p.size)
        tokens[i, columns], mask[i, columns] = p, True
    return tokens, mask


def _hf_greedy(hf, prompts, max_new_tokens=MAX_NEW):
    """transformers' greedy generate, left padding with an attention mask, no EOS."""
    tokens, mask = _padded(prompts, "left")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # With XLA's threads around, torch's thread pool makes tiny matmuls ~100x slower.
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                              attention_mask=torch.tensor(mask).long(), do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
                              pad_token_id=0)
    finally:
        torch.set_num_threads(threads)
    return out[:, tokens.shape[1]:].numpy()


@pytest.fixture(scope="module")
def greedy(model, prompts):
    config, params = model
    return gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, return_logits=True)


def test_greedy_matches_transformers_generate_with_left_padding(hf, prompts, greedy):
    expected = _hf_greedy(hf, prompts)
    assert len(set(expected[:, -1])) > 1  # The rows really differ.
    np.testing.assert_array_equal(greedy.tokens, expected)
    np.testing.assert_array_equal(greedy.lengths, [MAX_NEW] * 3)
    assert greedy.finish_reasons == ["length"] * 3


def test_mistral_sliding_window_matches_transformers_generate(prompts):
    reference = hf_model(MISTRAL)  # The window (12) is shorter than the sequences.
    config = ModelConfig.from_hf(MISTRAL)
    result = gen.generate(config, params_for(reference, config), prompts, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(result.tokens, _hf_greedy(reference, prompts))


def test_unscanned_layers_give_the_same_tokens(hf, prompts, greedy):
    config = ModelConfig.from_hf(HF_CONFIG, vocab_pad_multiple=64, scan_layers=False)
    result = gen.generate(config, params_for(hf, config), prompts, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def test_cached_logits_equal_uncached_forward_at_every_step(model, prompts, greedy):
    config, params = model
    forward = jax.jit(lambda p, t: llama.forward(config, p, t))
    for row, prompt in enumerate(prompts):
        sequence = np.concatenate([prompt, greedy.tokens[row]])[None]
        full = np.asarray(forward(params, sequence))[0]
        steps = full[prompt.size - 1: prompt.size - 1 + MAX_NEW]
        assert np.max(np.abs(greedy.logits[row] - steps)) <= TOL
        np.testing.assert_array_equal(greedy.tokens[row], steps.argmax(-1))


def test_left_padded_decoding_logits_equal_transformers_on_each_unpadded_sequence(hf, prompts, greedy):
    """Every row is left-padded (prompts of 5, 13 and 9 tokens in a 16-token bucket): the distributions of the
    prefill and of every cached step must equal transformers' on the row alone, without padding. Wrong RoPE
    positions under padding change these logits even where the random model's argmax does not move."""
    for row, prompt in enumerate(prompts):
        sequence = np.concatenate([prompt, greedy.tokens[row]])[None]
        reference = hf_logits(hf, sequence)[0, prompt.size - 1: prompt.size - 1 + MAX_NEW]
        ours = greedy.logits[row][:, :reference.shape[-1]]
        assert np.max(np.abs(ours - reference)) <= TOL * max(1.0, np.max(np.abs(reference))), row


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_arrays_give_the_same_tokens_as_a_list(model, prompts, greedy, side):
    config, params = model
    tokens, mask = _padded(prompts, side)
    result = gen.generate(config, params, tokens, mask, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def test_a_row_does_not_depend_on_the_others(model, prompts, greedy):
    config, params = model
    alone = gen.generate(config, params, prompts[1:2], max_new_tokens=MAX_NEW, batch_size=4)
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[1])


def test_stop_tokens_end_rows_independently(model, prompts, greedy):
    config, params = model
    stop_ids = (int(greedy.tokens[0, 6]), int(greedy.tokens[2, 20]))
    hits = [np.flatnonzero(np.isin(row, stop_ids)) for row in greedy.tokens]
    assert [h.size > 0 for h in hits] == [True, False, True]  # Row 1 never emits them.
    result = gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, stop_ids=stop_ids, pad_id=-1)
    for row in range(len(prompts)):
        length = hits[row][0] + 1 if hits[row].size else MAX_NEW
        assert result.lengths[row] == length and result.stopped[row] == (hits[row].size > 0)
        np.testing.assert_array_equal(result.tokens[row, :length], greedy.tokens[row, :length])
        assert np.all(result.tokens[row, length:] == -1)  # Stopped rows emit padding.
        assert result.completion(row).size == length - int(result.stopped[row])
    assert result.finish_reasons == ["stop", "length", "stop"]


SAMPLED = gen.SamplingConfig(temperature=0.7, top_k=8, top_p=0.5)


@pytest.fixture(scope="module")
def sampled(model, prompts):
    config, params = model
    return gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, sampling=SAMPLED, seed=1,
                        return_logits=True)


def test_sampling_is_reproducible_and_depends_on_the_seed(model, prompts, sampled, greedy):
    config, params = model
    run = lambda seed: gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, sampling=SAMPLED, seed=seed,
                                    return_logits=True)
    np.testing.assert_array_equal(run(1).tokens, sampled.tokens)
    assert np.mean(run(2).tokens != sampled.tokens) > 0.3
    assert np.mean(sampled.tokens != greedy.tokens) > 0.3


def test_tiny_top_p_is_greedy(model, prompts, greedy):
    config, params = model
    sampling = gen.SamplingConfig(temperature=1.0, top_p=1e-6)
    result = gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, sampling=sampling, seed=3)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def _check_filtered(result, sampling):
    """Every sampled token lies in the top-k / nucleus set of the logits it was drawn from."""
    for row in range(result.tokens.shape[0]):
        for step, token in enumerate(result.tokens[row]):
            logits = result.logits[row, step] / sampling.temperature
            order = np.argsort(-logits, kind="stable")
            allowed = order[:sampling.top_k] if sampling.top_k else order
            probs = np.exp(logits[allowed] - logits[allowed].max())
            probs /= probs.sum()
            mass_before = np.cumsum(probs) - probs
            assert token in allowed[mass_before < sampling.top_p]


def test_top_k_and_top_p_tokens_come_from_the_filtered_set(sampled):
    _check_filtered(sampled, SAMPLED)
    assert sampled.logits.shape[-1] == 320 and np.all(sampled.logits[..., 300:] < -1e8)


def test_top_p_alone_tokens_come_from_the_nucleus(model, prompts):
    config, params = model
    sampling = gen.SamplingConfig(temperature=1.3, top_p=0.2)
    result = gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, sampling=sampling, seed=4,
                          return_logits=True)
    _check_filtered(result, sampling)
    assert result.tokens.max() < 300  # Never a vocabulary-padding id.


def test_sharded_decoding_matches_one_device(model, prompts, greedy):
    config, params = model
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    params = jax.device_put(params, sharding.logical_to_sharding(llama.param_axes(config), mesh))
    result = gen.generate(config, params, prompts, max_new_tokens=MAX_NEW, mesh=mesh)
    np.testing.assert_array_equal(result.tokens, greedy.tokens)


def test_calls_in_one_shape_bucket_compile_once(model):
    config, params = model
    rng = np.random.default_rng(5)
    run = lambda lengths, **kw: gen.generate(config, params, [rng.integers(3, 300, n) for n in lengths],
                                             max_new_tokens=MAX_NEW, batch_size=4, **kw)
    programs = lambda: (decoding._prefill._cache_size(), decoding._decode_steps._cache_size())
    run((3, 7, 1, 12))
    compiled = programs()
    run((16, 2, 9, 4), stop_ids=(5, 6, 7), pad_id=3, seed=8)  # Same buckets (4 rows, 16 slots), other values.
    assert programs() == compiled
    run((40, 3, 5, 2))  # A longer prompt: a new length bucket (64) for it, and a longer cache (128).
    assert programs() == (compiled[0] + 1, compiled[1] + 1)


def test_bad_arguments_are_rejected(model, prompts):
    config, params = model
    with pytest.raises(ValueError, match="non-empty"):
        gen.generate(config, params, [prompts[0], np.zeros(0, np.int32)], max_new_tokens=2)
    with pytest.raises(ValueError, match="mask shape"):
        gen.generate(config, params, np.ones((2, 4), np.int32), np.ones((2, 3), bool), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate(config, params, prompts, max_new_tokens=2, batch_size=-1)


# ------------------------------------------------------------------------------------------------ tool documents


def test_bfcl_function_documents_become_json_schema_tools():
    bfcl_doc = {"name": "area.calc", "description": "Area.", "parameters": {"type": "dict", "properties": {
        "sides": {"type": "tuple", "items": {"type": "float"}, "description": "Sides."},
        "options": {"type": "dict", "properties": {"exact": {"type": "boolean"}, "note": {"type": "any"}}},
        "unit": {"description": "Unit."}}, "required": ["sides"]}}
    tool = tool_docs.tool_doc(bfcl_doc, "test")
    assert tool.name == "area.calc" and tool.required_parameters == ("sides",)
    properties = tool.parameters["properties"]
    assert tool.parameters["type"] == "object"
    assert properties["sides"] == {"type": "array", "items": {"type": "number", "format": "float"},
                                   "description": "Sides."}
    assert properties["options"]["type"] == "object"
    assert properties["options"]["properties"] == {"exact": {"type": "boolean"}, "note": {"type": "string"}}
    assert properties["unit"] == {"type": "string", "description": "Unit."}
    assert bfcl_doc["parameters"]["type"] == "dict"  # The input is not modified.
    wrapped = tool_docs.tool_doc({"type": "function", "function": bfcl_doc}, "test")
    assert wrapped == tool


def test_malformed_tool_documents_name_the_place(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"name": "f", "description": "", "parameters": {
        "type": "object", "properties": {"x": {"type": "complex"}}}}]))
    with pytest.raises(ValueError, match=r"tools.json\[0\].*'f'.*x.*'complex'"):
        tool_docs.read_tools(str(path))
    path.write_text("[{")
    with pytest.raises(ValueError, match="tools.json:1: invalid JSON"):
        tool_docs.read_tools(str(path))


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def llama3_checkpoint(tmp_path_factory):
    """A tiny random model with the real Llama-3 vocabulary, converted to an Orbax checkpoint."""
    from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

    root = tmp_path_factory.mktemp("llama3_tiny")
    config = ModelConfig(vocab_size=128256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=1024)
    write_random_hf_checkpoint(config, str(root / "hf"), seed=1)
    convert_hf_to_orbax(str(root / "hf"), str(root / "ckpt"))
    return str(root / "ckpt")


def test_a_bfloat16_checkpoint_decodes_on_cpu_in_float32(tmp_path, caplog):
    """load_model (generate, evaluate) runs a checkpoint recorded with dtype bfloat16 in float32 on CPU, as
    training does (sharding.model_for_mesh); its parameters stay bfloat16."""
    from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=256)
    write_random_hf_checkpoint(config, str(tmp_path / "hf"), seed=1)
    assert convert_hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ckpt"), dtype="bfloat16").dtype == "bfloat16"
    with caplog.at_level("WARNING", logger="hephaestus_jax"):
        loaded = gen.load_model(str(tmp_path / "ckpt"))
    assert "computing in float32 on CPU" in caplog.text and loaded.config.dtype == "float32"
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(loaded.params)} == {"bfloat16"}
    result = gen.generate(loaded.config, loaded.params, [np.arange(3, 9), np.arange(5, 8)], max_new_tokens=4,
                          mesh=loaded.mesh)
    assert [int(n) for n in result.lengths] == [4, 4]


def test_cli_prints_what_the_library_generates(llama3_checkpoint, tmp_path, capsys):
    from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "description": "Weather.", "parameters": {
        "type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]))
    texts = ["Weather in Oslo?", "And in Paris, tomorrow morning?"]
    argv = ["--checkpoint_dir", llama3_checkpoint, "--chat", "--system", "Be brief.", "--tools", str(tools),
            "--max_new_tokens", "6", *[a for text in texts for a in ("--prompt", text)]]
    assert generate.main(argv) == 0
    printed = capsys.readouterr().out

    vocab = load_vocabulary(default_tokenizer_path())
    loaded = gen.load_model(llama3_checkpoint)
    prompts = generate.encode_prompts(vocab, texts, chat=True, system="Be brief.", tools=tool_docs.read_tools(str(tools)))
    assert "get_weather" in vocab.decode(prompts[0].tolist()) and prompts[1][0] == vocab.bos_id
    result = gen.generate(loaded.config, loaded.params, prompts, max_new_tokens=6, stop_ids=vocab.stop_ids,
                          mesh=loaded.mesh)
    expected = "".join(f"--- completion {i} ({int(result.lengths[i])} tokens, finish: {result.finish_reasons[i]}) "
                       f"---\n{vocab.decode(result.completion(i).tolist())}\n" for i in range(2))
    assert printed == expected


def test_cli_rejects_tools_without_chat(llama3_checkpoint, capsys):
    assert generate.main(["--checkpoint_dir", llama3_checkpoint, "--prompt", "x", "--tools", "t.json"]) == 2
    assert "--tools need --chat" in capsys.readouterr().err
