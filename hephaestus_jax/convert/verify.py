"""Check a conversion by running the Hugging Face model and ours on the same tokens (torch + transformers)."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from hephaestus_jax import checkpoint_format as ckpt
from hephaestus_jax.convert import remote
from hephaestus_jax.convert.hf_to_orbax import hf_dtype, read_hf_config
from hephaestus_jax.convert.safetensors_io import ConversionError
from hephaestus_jax.model import llama

DEFAULT_TOLERANCE = 1e-3


def max_abs_logit_diff(hf_dir: str, checkpoint_dir: str, step: int | None = None, batch: int = 2,
                       seq_len: int = 16, seed: int = 0) -> float:
    """Max |logit difference| over the real vocabulary, both models in float32, on random tokens.

    Like is compared with like: each side's weights are first rounded to the other side's stored dtype (its
    config.json's for Hugging Face, `param_dtype` for ours), which is exactly what a conversion between the two
    does. A float32 checkpoint exported as bfloat16 is then checked against its own bf16-rounded weights, so the
    tolerance bounds the difference of the two implementations, not bf16's rounding.
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise ConversionError("--verify needs torch and transformers: pip install 'hephaestus-jax[test]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoint = ckpt.StoredCheckpoint(checkpoint_dir, step)
    stored = checkpoint.model_config
    with remote.local_input(hf_dir) as local_dir:  # gs://: one local copy serves config.json and the weights.
        _, hf_config = read_hf_config(local_dir)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            local_dir, dtype=getattr(torch, stored.param_dtype), local_files_only=True).float()
    hf_model.eval()
    config = stored.replace(dtype="float32", param_dtype="float32")
    params = jax.tree.map(lambda p: p.astype(hf_dtype(hf_config)).astype(np.float32),
                          checkpoint.restore_params(config))
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len))
    ours = np.asarray(llama.forward(config, params, tokens))[..., :config.vocab_size]
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.float().numpy()
    return float(np.max(np.abs(ours - theirs)))


def report(hf_dir: str, checkpoint_dir: str, tolerance: float, step: int | None = None) -> int:
    """Print `max_abs_logit_diff=<float>` (the tools' last stdout line); exit status 1 above `tolerance`."""
    diff = max_abs_logit_diff(hf_dir, checkpoint_dir, step=step)
    print(f"max_abs_logit_diff={diff:.3g}", flush=True)
    if diff > tolerance:
        print(f"verification FAILED: above tolerance {tolerance}", file=sys.stderr)
        return 1
    return 0
