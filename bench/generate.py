"""Greedy decoding throughput on CPU, side by side: our `inference.complete` vs transformers' `generate`.

    python bench/generate.py [--batches 1 16] [--new_tokens 32] [--rounds 3] [--min_len 250 --max_len 550]

Model: SmolLM2-135M's architecture (configs/model/smollm2_135m.gin: 30 layers, hidden 576, 9 heads and 3 KV heads
of 64, MLP 1536, vocabulary 49,152, tied; 134.5M parameters) with random weights, float32, on both sides (built
from the same config.json). Random weights decode exactly as fast as the real ones: both sides are forced to
produce `--new_tokens` tokens per prompt (no stop token; transformers with `min_new_tokens`), so the work is
the same whatever the tokens are. Prompts: `batch` random-token prompts per batch size, of lengths drawn
uniformly from [--min_len, --max_len] (BFCL prompts rendered with SmolLM2's chat template and a function document
are a few hundred tokens), the same on both sides.

Each side runs in its own worker process, one after the other; a worker compiles and warms up with one untimed
run of each measurement, then per round times a run with one new token (prefill: the prompts plus their first
token) and one with `--new_tokens` (prefill + decode). Prefill tokens/s = prompt tokens / the first; decode
tokens/s = batch * (new_tokens - 1) / (the second - the first); medians over `--rounds`, by wall clock and by
process CPU time (robust to other processes on a shared machine). transformers pads the batch on the left to its
longest prompt, as its `generate` needs; ours does what `complete` does.

Decode's memory-bandwidth bound: a decode step must read every weight (134.5M float32) and each row's keys and
values so far (layers * 2 * kv_heads * head_dim * 4 bytes per token of context, at the mean context of the decode
phase); that many bytes over this host's measured copy bandwidth (a large numpy copy, read + write bytes per
second) is the fastest a step can be; the fraction printed is that time over our measured step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import gin
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu, when installed, must not probe for TPU chips.

MODEL_GIN = "configs/model/smollm2_135m.gin"


def model_config():
    from hephaestus_jax.config import ModelConfig

    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings([os.path.join(REPO, MODEL_GIN)], [])
    try:
        return ModelConfig(dtype="float32", param_dtype="float32")
    finally:
        gin.clear_config()


def make_prompts(batch: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """`batch` prompts of random tokens (avoiding ids 0-2: padding, bos, eos) with lengths in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, batch)
    return [rng.integers(3, vocab_size, n).astype(np.int32) for n in lengths]


def ours_runner(config, prompts: list[np.ndarray]):
    """`run(new_tokens)`: `inference.complete` on the prompts at batch len(prompts), no stop tokens."""
    import jax

    from hephaestus_jax import inference, startup
    from hephaestus_jax.model import llama

    startup.keep_host_memory()
    params = llama.unbox(llama.init_params(config, jax.random.key(0)))

    def run(new_tokens: int) -> None:
        completions = inference.complete(config, params, prompts, max_new_tokens=new_tokens, stop_ids=(),
                                         batch_size=len(prompts))
        assert all(c.size == new_tokens for c in completions), [c.size for c in completions]
    return run


def transformers_runner(config, prompts: list[np.ndarray]):
    """`run(new_tokens)`: transformers' greedy `generate`, left padding, exactly `new_tokens` new tokens."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    length = max(p.size for p in prompts)
    tokens = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        tokens[row, length - prompt.size:], mask[row, length - prompt.size:] = prompt, 1

    def run(new_tokens: int) -> None:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=0)
        assert out.shape[1] == length + new_tokens, out.shape
    return run


def timed(run, new_tokens: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `run(new_tokens)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    run(new_tokens)
    return time.perf_counter() - wall, time.process_time() - cpu


def worker(side: str, batch: int, args: argparse.Namespace) -> None:
    """One side's process: warm up, then per round time a prefill-only run and a full run; JSON on stdout."""
    config = model_config()
    prompts = make_prompts(batch, args.min_len, args.max_len, config.vocab_size)
    run = (ours_runner if side == "ours" else transformers_runner)(config, prompts)
    run(1), run(args.new_tokens)  # Compile, warm up.
    rounds = [(timed(run, 1), timed(run, args.new_tokens)) for _ in range(args.rounds)]
    print(json.dumps({"rounds": rounds}), flush=True)


def side_rounds(side: str, batch: int) -> list:
    """Run one side's worker process (`--worker SIDE --batch N`) and return its rounds."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", side, "--worker_batch",
                          str(batch)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rounds"]


def summarize(rounds: list, prompt_tokens: int, batch: int, new_tokens: int) -> dict[str, float]:
    """Median prefill and decode tokens/s, by wall clock and by CPU time, from [(prefill run, full run)]."""
    result = {}
    for clock, index in (("wall", 0), ("cpu", 1)):
        prefill = float(np.median([first[index] for first, _ in rounds]))
        decode = float(np.median([full[index] - first[index] for first, full in rounds]))
        result[f"prefill_{clock}"] = prompt_tokens / prefill
        result[f"decode_{clock}"] = batch * (new_tokens - 1) / decode
        result[f"step_{clock}"] = decode / (new_tokens - 1)
        result[f"total_{clock}"] = float(np.median([full[index] for _, full in rounds]))
    return result


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + written), best of `repeats`."""
    source = np.ones(megabytes << 18, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def decode_step_bytes(config, prompts: list[np.ndarray], new_tokens: int) -> float:
    """Bytes one decode step must read: every weight, and each row's keys and values at the decode phase's mean
    context (its prompt plus half the new tokens)."""
    per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4
    context = sum(p.size + new_tokens / 2 for p in prompts)
    return config.num_params() * 4 + context * per_token


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min_len", type=int, default=250)
    parser.add_argument("--max_len", type=int, default=550)
    parser.add_argument("--sides", nargs="+", default=["ours", "transformers"], choices=("ours", "transformers"))
    parser.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.worker_batch, args)
        return

    config = model_config()
    bandwidth = copy_bandwidth()
    print(f"model: {MODEL_GIN} (random weights), {config.num_params() / 1e6:.1f}M params, float32; prompts of "
          f"{args.min_len}-{args.max_len} tokens, {args.new_tokens} new tokens, {args.rounds} rounds; "
          f"{os.cpu_count()} CPU cores; copy bandwidth {bandwidth / 1e9:.1f} GB/s; {load()}", flush=True)
    print("| batch | side | prefill tok/s (CPU-time) | decode tok/s (CPU-time) | decode step | bandwidth bound |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        prompts = make_prompts(batch, args.min_len, args.max_len, config.vocab_size)
        prompt_tokens = sum(p.size for p in prompts)
        bound = decode_step_bytes(config, prompts, args.new_tokens) / bandwidth
        figures = {}
        for side in args.sides:
            figures[side] = summarize(side_rounds(side, batch), prompt_tokens, batch, args.new_tokens)
            f = figures[side]
            print(f"| {batch} | {side} | {f['prefill_wall']:,.0f} ({f['prefill_cpu']:,.0f}) | {f['decode_wall']:,.1f} "
                  f"({f['decode_cpu']:,.1f}) | {f['step_wall'] * 1e3:.0f} ms | {bound / f['step_wall']:.0%} of "
                  f"{bound * 1e3:.0f} ms | {load()}", flush=True)
        if len(figures) == 2:
            ours, theirs = figures["ours"], figures["transformers"]
            print(f"batch {batch}: ours/transformers prefill {ours['prefill_wall'] / theirs['prefill_wall']:.2f}x "
                  f"(CPU-time {ours['prefill_cpu'] / theirs['prefill_cpu']:.2f}x), decode "
                  f"{ours['decode_wall'] / theirs['decode_wall']:.2f}x (CPU-time "
                  f"{ours['decode_cpu'] / theirs['decode_cpu']:.2f}x), end to end "
                  f"{theirs['total_wall'] / ours['total_wall']:.2f}x (CPU-time "
                  f"{theirs['total_cpu'] / ours['total_cpu']:.2f}x); {load()}", flush=True)


if __name__ == "__main__":
    main()
