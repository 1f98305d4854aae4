"""The optimizer: AdamW (no decay on norm scales), global-norm clipping, warmup + cosine or WSD schedules."""

from __future__ import annotations

from typing import Any

import jax
import optax

from hephaestus_jax.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    """Step -> learning rate. Warmup is linear from 0; the schedule ends at the last step."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = min(config.warmup_steps, num_steps)
    after_warmup = max(num_steps - warmup, 1)
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps=after_warmup, alpha=config.min_lr_ratio)
    else:  # Warmup-stable-decay: flat at the peak, then a linear ramp to the floor over the last fraction.
        decay_steps = max(int(round(config.decay_fraction * after_warmup)), 1)
        decay = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay_steps)],
            boundaries=[after_warmup - decay_steps])
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: every matrix; norm scales (`.../scale`) are exempt."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(config, num_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask),
    )

