"""Train-step throughput on CPU, side by side: our jitted step vs transformers' LlamaForCausalLM + torch AdamW.

    python bench/train_step.py [--model configs/model/tiny.gin] [--gin_param 'ModelConfig.hidden_size=512' ...]
        [--batch 8] [--seq_len 256] [--steps 10] [--logits_chunk_size N]

Both run the same architecture (converted through the same config.json), batch and sequence length, float32,
AdamW with the same settings; both use all CPU cores. Prints tokens/s for each, the ratio (target >= 1.5x),
and our MFU against this CPU's measured matmul peak (target >= 40%).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def bench_ours(config, tokens: np.ndarray, steps: int) -> float:
    import jax

    from hephaestus_jax import sharding
    from hephaestus_jax.config import MeshConfig, OptimizerConfig
    from hephaestus_jax.train_state import TrainStep

    mesh = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    step_fn = TrainStep.create(config, mesh, OptimizerConfig(learning_rate=1e-4, warmup_steps=0), num_steps=1000)
    state = step_fn.init(jax.random.key(0))
    rows, length = tokens.shape
    batch = sharding.global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(length - 1, dtype=np.int32), (rows, length - 1)).copy(),
        "segment_ids": np.ones((rows, length - 1), np.int32), "loss_weights": np.ones((rows, length - 1), np.float32),
    }, mesh)
    for _ in range(2):  # Compile and warm up.
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def bench_torch(config, tokens: np.ndarray, steps: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.tensor(tokens[:, :-1].astype(np.int64))  # HF shifts labels itself.

    def step():
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(REPO, "configs/model/tiny.gin"))
    parser.add_argument("--gin_param", action="append", default=[], help="ModelConfig overrides (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--logits_chunk_size", type=int, default=0, help="ours: loss computed this many positions "
                        "at a time (0: all at once)")
    args = parser.parse_args()

    from hephaestus_jax.config import ModelConfig
    from hephaestus_jax.metrics import measure_cpu_peak_flops, training_flops_per_token

    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings([args.model], args.gin_param)
    config = ModelConfig(dtype="float32", param_dtype="float32", logits_chunk_size=args.logits_chunk_size)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq_len

    ours = bench_ours(config, tokens, args.steps)
    theirs = bench_torch(config, tokens, args.steps)
    peak = measure_cpu_peak_flops("float32")
    flops = tokens_per_step * training_flops_per_token(config, args.seq_len)
    print(f"model: {config.num_params() / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, float32, "
          f"{os.cpu_count()} CPU cores, logits_chunk_size={config.logits_chunk_size}")
    print(f"ours (jax):           {tokens_per_step / ours:10,.0f} tokens/s  ({ours * 1e3:.1f} ms/step)")
    print(f"transformers + torch: {tokens_per_step / theirs:10,.0f} tokens/s  ({theirs * 1e3:.1f} ms/step)")
    print(f"speed ratio ours/torch = {theirs / ours:.2f}x (target >= 1.5x)")
    print(f"MFU vs measured CPU matmul peak ({peak / 1e9:.1f} GFLOP/s): {flops / ours / peak:.1%} (target >= 40%)")


if __name__ == "__main__":
    main()
