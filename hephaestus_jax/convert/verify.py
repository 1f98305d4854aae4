"""Check a conversion by running the Hugging Face model and ours on the same tokens (torch + transformers).

`LogitComparison` is the one rule for comparing our logits with transformers': the converters' `--verify` and
the tests import it rather than restating a tolerance.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax.convert import remote
from hephaestus_jax.convert.hf_to_orbax import hf_dtype, read_hf_config
from hephaestus_jax.convert.safetensors_io import ConversionError
from hephaestus_jax.model import llama

RELATIVE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class LogitComparison:
    """Our float32 logits against transformers' float32 logits on the same weights and tokens.

    They pass when max |ours - theirs| <= `rtol` x max |theirs| (`rtol` = 1e-4). Neither side is exact: the
    difference is float32 rounding, which grows with the model's activations and so with its logits; no absolute
    number fits every model. On SmolLM2-135M it comes from the accumulation order of float32 matmuls (XLA:CPU's
    MLP down projection errs about twice as much as torch's GEMM, and SmolLM2's massive activations, |residual|
    up to 2.3e4, make that 1.5e-2 on one element), not from XLA:CPU's exp or rsqrt (within 1-2.7 ulp, as
    torch's), matmul precision (already full float32 on CPU) or attention normalising after the PV matmul.
    Correct conversions measured 1e-5 to 6e-5 of the logit scale, mistakes from 2.8e-4 (one layer's up_proj
    x1.001) up; the figures are in docs/design.md. bfloat16 exports get the same bound: `compare` gives both
    sides the same bf16-rounded weights and computes in float32, so their difference is float32 rounding too.
    """

    max_abs_diff: float
    logit_scale: float  # max |transformers' logit|
    rtol: float = RELATIVE_TOLERANCE

    @classmethod
    def of(cls, ours: np.ndarray, theirs: np.ndarray, rtol: float = RELATIVE_TOLERANCE) -> "LogitComparison":
        """Compare logits over the same (real) vocabulary; `theirs` are transformers'."""
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        return cls(float(np.max(np.abs(ours - theirs))), float(np.max(np.abs(theirs))), rtol)

    @property
    def bound(self) -> float:
        return self.rtol * self.logit_scale

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound

    def figures(self) -> str:
        return (f"max_abs_logit_diff={self.max_abs_diff:.3g} bound={self.bound:.3g} "
                f"({self.rtol:.0e} x max|logit| {self.logit_scale:.3g})")

    def __str__(self) -> str:
        return f"{self.figures()}: {'passed' if self.passed else 'FAILED'}"


class VerificationFailed(RuntimeError):
    """A conversion's logits are above the bound; `result` holds the comparison."""

    def __init__(self, result: LogitComparison):
        super().__init__(f"verification FAILED: {result.figures()}")
        self.result = result


def compare(hf_dir: str, checkpoint_dir: str, step: int | None = None, rtol: float = RELATIVE_TOLERANCE,
            batch: int = 2, seq_len: int = 16, seed: int = 0) -> LogitComparison:
    """Both models' logits over the real vocabulary, in float32, on random tokens.

    Like is compared with like: each side's weights are first rounded to the other side's stored dtype (its
    config.json's for Hugging Face, `param_dtype` for ours), which is exactly what a conversion between the two
    does. A float32 checkpoint exported as bfloat16 is then checked against its own bf16-rounded weights, so the
    bound measures the two implementations, not bf16's rounding.
    """
    try:
        import torch
        import transformers
    except ImportError:
        raise ConversionError("--verify needs torch and transformers: pip install -e '.[hf]'") from None
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
    return LogitComparison.of(ours, theirs, rtol)


class Verifier:
    """The converters' `check` for --verify: compares the complete output, before it is moved into place, with
    its source; raises VerificationFailed above the bound (the converter then removes the output)."""

    def __init__(self, step: int | None = None, rtol: float = RELATIVE_TOLERANCE):
        self.step, self.rtol = step, rtol
        self.result: LogitComparison | None = None

    def __call__(self, hf_dir: str, checkpoint_dir: str) -> None:
        self.result = compare(hf_dir, checkpoint_dir, self.step, self.rtol)
        if not self.result.passed:
            raise VerificationFailed(self.result)
