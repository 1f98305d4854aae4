"""What the backward pass keeps: `ModelConfig.remat_policy` -> a `jax.checkpoint` policy.

The layers' projections name their outputs (`kernels.project`): PROJECTION_NAMES. On the fast kernels their
matmuls run inside a custom VJP, which hides them from `dots_saveable`, so the dot policies also keep them by
name (tests/model/test_model_parity.py checks what each policy keeps, and tests/model/test_kernels.py that the
model names exactly these).
"""

import jax

PROJECTION_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj", "mlp_gate", "mlp_up", "mlp_down")

_POLICIES = jax.checkpoint_policies
REMAT_POLICIES = {  # Keys: config.REMAT_POLICY_NAMES.
    "none": None,  # No rematerialisation.
    "full": _POLICIES.nothing_saveable,
    "dots": _POLICIES.save_from_both_policies(_POLICIES.dots_saveable,
                                              _POLICIES.save_only_these_names(*PROJECTION_NAMES)),
    "dots_no_batch": _POLICIES.save_from_both_policies(_POLICIES.dots_with_no_batch_dims_saveable,
                                                       _POLICIES.save_only_these_names(*PROJECTION_NAMES)),
    "qkv_out": _POLICIES.save_only_these_names(*PROJECTION_NAMES[:4]),  # The attention projections.
}
