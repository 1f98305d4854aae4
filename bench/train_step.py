"""Train-step throughput on CPU, side by side: our jitted step vs transformers' LlamaForCausalLM + torch AdamW.

    python bench/train_step.py [--shape 155m|smollm2|tiny | --model configs/model/X.gin]
        [--gin_param 'ModelConfig.num_layers=4' ...] [--batch 4] [--seq_len 512] [--rounds 5]
        [--logits_chunk_size N] [--matmul_ceiling]

Shapes: `155m` (the default) is Llama-3 shaped with the real 128,256-token vocabulary, hidden 512, 8 layers,
8 heads and 2 KV heads of 64, MLP 1536, untied (155.5M parameters); `smollm2` is SmolLM2-135M
(configs/model/smollm2_135m.gin: 30 layers, hidden 576, vocabulary 49,152, tied); `tiny` is
configs/model/tiny.gin (almost all of its cost is the 128K-vocabulary embedding).

Both sides run the same architecture (converted through the same config.json), batch and sequence length,
float32, AdamW with the same settings and global-norm clipping, on all CPU cores, each in its own worker process,
as each is used: ours starts like our commands (`startup.keep_host_memory()`), torch with its defaults
(`--same_allocator` gives torch's process the same malloc settings). The sides run one after the other, each
process alone in memory: one process holding both sides made ours 5 s per step slower on SmolLM2, and ours idle
next to torch's worker (keeping its 11 GB of host memory) made torch's 155M step 60% slower
(docs/performance.md). Each side is built and warmed up with three steps, then times `--rounds` steps; run it on
a quiet machine. Each step prints its wall time, the process CPU seconds and the load average; the summary prints
the median step's tokens/s (a one-off, such as ours growing its heap once more in an early step, does not move
it), the ratio as `speed ratio ours/torch = X.XXx` (target >= 1.5x) and both sides' MFU against this CPU's
measured float32 matmul peak (target >= 60%), by wall clock and by process CPU time (robust to a shared machine's
load). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Callable

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {  # name -> (gin file, bindings on top of it)
    "155m": ("configs/model/llama3_8b.gin", [
        "ModelConfig.hidden_size = 512", "ModelConfig.intermediate_size = 1536", "ModelConfig.num_layers = 8",
        "ModelConfig.num_heads = 8", "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 64"]),
    "smollm2": ("configs/model/smollm2_135m.gin", []),
    "tiny": ("configs/model/tiny.gin", []),
}


def ours_step(config, tokens: np.ndarray) -> Callable[[], None]:
    """Our jitted train step (state donated and carried), compiled and warmed up; returns one blocking step."""
    import jax

    from hephaestus_jax import sharding
    from hephaestus_jax.config import MeshConfig, OptimizerConfig
    from hephaestus_jax.train_step import TrainStep

    mesh = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    step_fn = TrainStep.create(config, mesh, OptimizerConfig(learning_rate=1e-4, warmup_steps=0), num_steps=1000)
    rows, length = tokens.shape
    batch = sharding.global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(length - 1, dtype=np.int32), (rows, length - 1)).copy(),
        "segment_ids": np.ones((rows, length - 1), np.int32), "loss_weights": np.ones((rows, length - 1), np.float32),
    }, mesh)
    state = [step_fn.init(jax.random.key(0))]

    def step() -> None:
        state[0], metrics = step_fn(state[0], batch)
        jax.block_until_ready(metrics)

    step()  # Compile and warm up.
    return step


def torch_step(config, tokens: np.ndarray) -> Callable[[], None]:
    """transformers' model from the same config.json with torch AdamW, warmed up; returns one step."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.tensor(tokens[:, :-1].astype(np.int64))  # HF shifts labels itself.

    def step() -> None:
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return step


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_flops_per_cpu_second(size: int = 1024, repeats: int = 20) -> float:
    """float32 matmul FLOPs per process-CPU second (one XLA matmul on all cores): a per-core peak that time
    sharing on a loaded machine does not dilute (wall-clock peaks do)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    cpu = time.process_time()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return repeats * 2 * size**3 / (time.process_time() - cpu)


def step_matmuls(config, rows: int, seq_len: int) -> list[tuple[str, tuple, tuple, int]]:
    """The matmuls of one of our train steps as (einsum, lhs shape, rhs shape, times per step), as
    `llama.DecoderLayer` runs them: the forward, input-gradient and weight-gradient matmuls of each projection
    (q; k and v; o; gate and up; down; the output head), then per causal query block attention's scores and dP,
    PV and dQ, dK and dV."""
    from hephaestus_jax.model import llama

    tokens, d, f, hd = rows * seq_len, config.hidden_size, config.intermediate_size, config.head_dim
    group, kv, layers = config.num_heads // config.num_kv_heads, config.num_kv_heads, config.num_layers
    found = []
    for n_in, n_out, count in ((d, config.num_heads * hd, layers), (d, kv * hd, 2 * layers),
                               (config.num_heads * hd, d, layers), (d, f, 2 * layers), (f, d, layers),
                               (d, config.padded_vocab_size, 1)):
        found += [("ti,oi->to", (tokens, n_in), (n_out, n_in), count),
                  ("to,oi->ti", (tokens, n_out), (n_out, n_in), count),
                  ("ti,to->io", (tokens, n_in), (tokens, n_out), count)]
    blocks = min(llama.CAUSAL_BLOCKS, seq_len)
    edges = [seq_len * i // blocks for i in range(blocks + 1)]
    for start, end in zip(edges[:-1], edges[1:]):
        q, k = (rows, kv, group, end - start, hd), (rows, kv, end, hd)
        scores = (rows, kv, group, end - start, end)
        found += [("bkgsd,bktd->bkgst", q, k, 2 * layers), ("bkgst,bktd->bkgsd", scores, k, 2 * layers),
                  ("bkgst,bkgsd->bktd", scores, q, 2 * layers)]
    return found


def matmul_seconds(config, rows: int, seq_len: int, repeats: int = 3) -> float:
    """Seconds per step that our step's matmuls (`step_matmuls`) take alone: each jitted XLA matmul timed on its
    own (best of `repeats`) times how often the step runs it. The step cannot be faster than this."""
    import jax
    import jax.numpy as jnp

    from hephaestus_jax.metrics import best_seconds

    return sum(count * best_seconds(jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b)),
                                    jnp.ones(lhs, jnp.float32), jnp.ones(rhs, jnp.float32), repeats=repeats)
               for spec, lhs, rhs, count in step_matmuls(config, rows, seq_len))


def worker(side: str, config, tokens: np.ndarray, keep_host_memory: bool) -> None:
    """One side's process: build and warm up, then time a step per line on stdin ("wall cpu" on stdout)."""
    from hephaestus_jax import startup

    if keep_host_memory:
        startup.keep_host_memory()
    step = ours_step(config, tokens) if side == "ours" else torch_step(config, tokens)
    for _ in range(2):  # More warm-up: both sides' first steps after compiling are slower (allocators fill).
        step()
    print("ready", flush=True)
    for _ in sys.stdin:
        print("%r %r" % timed(step), flush=True)


class Side:
    """A worker process running one side (`python bench/train_step.py --worker SIDE ...`)."""

    def __init__(self, side: str, argv: list[str]):
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", side],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.wait_ready(side)

    def wait_ready(self, side: str) -> None:
        for line in self.process.stdout:
            if line.strip() == "ready":
                return
        raise RuntimeError(f"the {side} worker ended before it was ready (exit {self.process.wait()})")

    def step(self) -> tuple[float, float]:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        wall, cpu = self.process.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="155m")
    parser.add_argument("--model", help="a model gin file instead of --shape (e.g. configs/model/smollm2_135m.gin)")
    parser.add_argument("--gin_param", action="append", default=[], help="ModelConfig overrides (repeatable)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per side")
    parser.add_argument("--logits_chunk_size", type=int, default=0, help="ours: loss computed this many positions "
                        "at a time (0: all at once)")
    parser.add_argument("--same_allocator", action="store_true", help="give torch's process our malloc settings "
                        "too (startup.keep_host_memory)")
    parser.add_argument("--matmul_ceiling", action="store_true", help="also time our step's matmuls alone "
                        "(step_matmuls) and print the ratio ours/torch would reach if nothing else took time")
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from hephaestus_jax.config import ModelConfig
    from hephaestus_jax.metrics import measure_cpu_peak_flops, training_flops_per_token

    gin_file, bindings = (args.model, []) if args.model else SHAPES[args.shape]
    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings([os.path.join(REPO, gin_file)], bindings + args.gin_param)
    config = ModelConfig(dtype="float32", param_dtype="float32", logits_chunk_size=args.logits_chunk_size)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    tokens_per_step = args.batch * args.seq_len
    if args.worker:
        worker(args.worker, config, tokens, keep_host_memory=args.worker == "ours" or args.same_allocator)
        return
    print(f"model: {gin_file} {' '.join(args.gin_param)}: {config.num_params() / 1e6:.1f}M params, {config.num_layers} "
          f"layers, vocabulary {config.vocab_size}, batch {args.batch} x {args.seq_len}, float32, "
          f"{os.cpu_count()} CPU cores, logits_chunk_size={config.logits_chunk_size}, torch allocator "
          f"{'ours' if args.same_allocator else 'default'}; {load()}", flush=True)

    peaks = [measure_cpu_peak_flops("float32")]
    cpu_peaks = [matmul_flops_per_cpu_second()]
    times: dict[str, list[tuple[float, float]]] = {}
    for name in ("ours", "torch"):  # One side's process at a time: each has the machine's memory to itself.
        side, times[name] = Side(name, sys.argv[1:]), []
        for round_ in range(args.rounds):
            times[name].append(side.step())
            print(f"{name} step {round_}: {times[name][-1][0]:.2f} s ({times[name][-1][1]:.2f} CPU s); {load()}",
                  flush=True)
        side.close()
    peaks.append(measure_cpu_peak_flops("float32"))
    cpu_peaks.append(matmul_flops_per_cpu_second())

    peak, cpu_peak = max(peaks), max(cpu_peaks)
    flops = tokens_per_step * training_flops_per_token(config, args.seq_len)
    median = {name: float(np.median([wall for wall, _ in t])) for name, t in times.items()}
    cpu = {name: float(np.median([c for _, c in t])) for name, t in times.items()}
    for name, label in (("ours", "ours (jax)"), ("torch", "transformers + torch")):
        print(f"{label + ':':22s}{tokens_per_step / median[name]:10,.0f} tokens/s  ({median[name]:.2f} s/step, "
              f"{cpu[name]:.2f} CPU s/step, MFU {flops / median[name] / peak:.1%}, "
              f"CPU-time MFU {flops / cpu[name] / cpu_peak:.1%})")
    print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of before/after: "
          f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}), {cpu_peak / 1e9:.1f} GFLOP per CPU second; "
          f"{flops / 1e9:.0f} GFLOP per step; {load()}")
    print(f"speed ratio ours/torch = {median['torch'] / median['ours']:.2f}x (target >= 1.5x); "
          f"CPU-time ratio {cpu['torch'] / cpu['ours']:.2f}x; our MFU {flops / median['ours'] / peak:.1%}, "
          f"CPU-time MFU {flops / cpu['ours'] / cpu_peak:.1%} (target >= 60%)")
    if args.matmul_ceiling:
        matmuls = matmul_seconds(config, args.batch, args.seq_len)
        print(f"our step's matmuls alone: {matmuls:.2f} s/step ({matmuls / median['ours']:.0%} of our step); "
              f"ceiling ours/torch = {median['torch'] / matmuls:.2f}x if nothing but matmuls took time")


if __name__ == "__main__":
    main()
