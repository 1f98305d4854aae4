"""Logit parity of our Flax model against transformers' LlamaForCausalLM / MistralForCausalLM (float32)."""

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from support.hf_reference import LLAMA31_SCALING, TINY_HF, hf_logits, hf_model, params_for
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert import mapping
from hephaestus_jax.convert.verify import LogitComparison
from hephaestus_jax.model import llama

CASES = {
    # (a) GQA (4 query heads share 2 KV heads), given as a Hub-dialect config.json dict.
    "gqa_hub_dialect": dict(TINY_HF),
    # (b) Llama-3.1 rope scaling; the test sequence (48) runs past original_max_position_embeddings (16).
    "llama31_rope_scaling": dict(TINY_HF, rope_scaling=LLAMA31_SCALING),
    # (c) Tied input/output embeddings (Llama-3.2 1B/3B), with transformers >= 5's rope_parameters dialect.
    "tied_v5_dialect": dict({k: v for k, v in TINY_HF.items() if k != "rope_theta"}, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Mistral with a sliding window shorter than the sequence.
    "mistral_sliding_window": dict(TINY_HF, model_type="mistral", sliding_window=12, rope_theta=10000.0),
}


def _forward(config, params, tokens, positions=None, segment_ids=None):
    return np.asarray(jax.jit(lambda p, t, pos, seg: llama.forward(config, p, t, pos, seg))(
        params, tokens, positions, segment_ids))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(name, scan_layers):
    hf_config = CASES[name]
    model = hf_model(hf_config)
    config = ModelConfig.from_hf(hf_config, scan_layers=scan_layers)
    tokens = np.random.default_rng(1).integers(0, hf_config["vocab_size"], (2, 48))
    ours = _forward(config, params_for(model, config), tokens)
    assert LogitComparison.of(ours, hf_logits(model, tokens)).passed


def test_packed_documents_match_separate_runs():
    """Two documents packed in one row (segment ids, per-document positions) == HF on each document alone."""
    hf_config = CASES["llama31_rope_scaling"]
    model = hf_model(hf_config)
    config = ModelConfig.from_hf(hf_config)
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, 300, 30), rng.integers(0, 300, 26)
    tokens = np.concatenate([doc_a, doc_b])[None]
    positions = np.concatenate([np.arange(30), np.arange(26)])[None]
    segment_ids = np.concatenate([np.full(30, 1), np.full(26, 2)])[None]
    ours = _forward(config, params_for(model, config), tokens, positions, segment_ids)[0]
    assert LogitComparison.of(ours[:30], hf_logits(model, doc_a[None])[0]).passed
    assert LogitComparison.of(ours[30:], hf_logits(model, doc_b[None])[0]).passed


def test_padded_vocabulary_is_never_predicted():
    config = ModelConfig.from_hf(TINY_HF, vocab_pad_multiple=128)
    assert config.padded_vocab_size == 384
    model = hf_model(TINY_HF)
    tokens = np.random.default_rng(3).integers(0, 300, (1, 8))
    logits = _forward(config, params_for(model, config), tokens)
    assert logits.shape[-1] == 384
    assert LogitComparison.of(logits[..., :300], hf_logits(model, tokens)).passed
    assert np.all(logits[..., 300:] < -1e8)
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(np.max(probs[..., 300:])) == 0.0


def test_bfloat16_compute_stays_close():
    """bf16 compute with fp32 params: close to the float32 reference, not exact (a sanity bound)."""
    model = hf_model(TINY_HF)
    config = ModelConfig.from_hf(TINY_HF, dtype="bfloat16")
    tokens = np.random.default_rng(4).integers(0, 300, (2, 16))
    ours = _forward(config, params_for(model, config), tokens)
    reference = hf_logits(model, tokens)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - reference)) < 0.1 * np.max(np.abs(reference))


@pytest.mark.parametrize("name", ["gqa_hub_dialect", "mistral_sliding_window", "tied_v5_dialect"])
def test_gradients_match_transformers(name):
    """Every parameter's gradient of the next-token loss equals torch autograd's through transformers (our
    attention and SwiGLU have hand-written backward passes)."""
    hf_config = CASES[name]
    model = hf_model(hf_config)
    config = ModelConfig.from_hf(hf_config)
    tokens = np.random.default_rng(6).integers(0, hf_config["vocab_size"], (2, 40))
    model.zero_grad()
    model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    expected = mapping.params_from_hf(hf_grads.__getitem__, config)

    def loss(params):
        logits = llama.forward(config, params, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    ours = jax.jit(jax.grad(loss))(params_for(model, config))
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    for path, grad in jax.tree_util.tree_leaves_with_path(ours):
        scale = float(np.max(np.abs(flat_expected[path])))
        assert scale > 0, path
        np.testing.assert_allclose(grad, flat_expected[path], atol=2e-5 * scale, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "qkv_out"])
def test_remat_policies_do_not_change_gradients(policy):
    base = ModelConfig.from_hf(TINY_HF)
    params = llama.unbox(llama.init_params(base, jax.random.key(0)))
    tokens = np.random.default_rng(5).integers(0, 300, (2, 16))

    def grads(config):
        loss = lambda p: llama.forward(config, p, tokens).mean()
        return jax.jit(jax.grad(loss))(params)

    reference, rematted = grads(base), grads(base.replace(remat_policy=policy))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6)


# Per layer, what the backward pass keeps besides the layer input: qkv_out its four names; dots_no_batch also the
# MLP's gate and up outputs (the down projection's output only feeds the residual sum, which needs no value);
# dots also attention's scores and probabilities, in each of its 4 causal query blocks.
KEPT_PER_LAYER = {"full": 0, "qkv_out": 4, "dots_no_batch": 6, "dots": 6 + 2 * 4}


@pytest.mark.parametrize("policy", sorted(KEPT_PER_LAYER))
def test_remat_policies_keep_the_named_projections(policy, capsys):
    """The projections run in a custom VJP; the dot policies still keep their outputs, by name."""
    config = ModelConfig.from_hf(TINY_HF, remat_policy=policy)
    params = llama.unbox(llama.init_params(config, jax.random.key(0)))
    tokens = np.zeros((3, 16), np.int32)  # 3 rows, 2 layers: a stacked residual starts [2, 3, ...].
    jax.ad_checkpoint.print_saved_residuals(lambda p: llama.forward(config, p, tokens).mean(), params)
    per_layer = [line for line in capsys.readouterr().out.splitlines()
                 if line.startswith(f"f32[{config.num_layers},3,") and "from the argument" not in line]
    assert len(per_layer) == 1 + KEPT_PER_LAYER[policy], per_layer


def test_init_carries_logical_axes():
    config = ModelConfig.from_hf(TINY_HF)
    axes = jax.tree.map(tuple, llama.param_axes(config), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert axes["layers"]["attn"]["q_proj"] == ("layers", "heads", "head_dim", "embed")
    assert axes["layers"]["attn"]["k_proj"] == ("layers", "kv_heads", "head_dim", "embed")
    assert axes["layers"]["mlp"]["down_proj"] == ("layers", "embed", "mlp")
    assert axes["embed"] == ("vocab", "embed") and axes["lm_head"] == ("vocab", "embed")
    unscanned = llama.param_axes(config.replace(scan_layers=False))
    assert tuple(unscanned["layers_1"]["attn"]["o_proj"]) == ("embed", "heads", "head_dim")
    assert "lm_head" not in llama.param_axes(config.replace(tie_word_embeddings=True))


def test_torch_is_the_cpu_reference_build():
    assert torch.__version__.startswith("2.13.0")
