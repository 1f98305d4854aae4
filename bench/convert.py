"""Conversion speed and memory, side by side with `cp`, on a random Llama-3.2-1B-shaped bf16 checkpoint.

    python bench/convert.py [--workdir /tmp/bench_convert] [--model configs/model/llama3_2_1b.gin]

Prints, for HF -> Orbax and Orbax -> HF: seconds, the ratio `cp time / conversion time` (target >= 0.5) and the
converter's peak RSS next to the largest tensor (target: peak <= largest + 1 GiB). Each conversion runs in a
fresh process so its peak RSS is its own. Both `cp` and the conversions are timed until their data is on disk
(`sync`), so neither is flattered by the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import gin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hephaestus_jax.config import ModelConfig  # noqa: E402
from hephaestus_jax.convert import mapping  # noqa: E402
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint  # noqa: E402

# Peak RSS is read from VmHWM: unlike ru_maxrss, it is not inherited from the parent across fork + exec.
_CHILD = """
import json, os, re, sys, time
from hephaestus_jax.convert.{module} import {function}
os.sync()
start = time.perf_counter()
{function}(*sys.argv[1:3])
os.sync()
seconds = time.perf_counter() - start
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({{"seconds": seconds, "peak_rss": peak_kib * 1024}}))
"""


def timed_copy(source: str, dest: str) -> float:
    """Seconds of `cp -r` until the copy is on disk."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", source, dest], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    shutil.rmtree(dest)
    return seconds


def run_child(module: str, function: str, *args: str) -> dict:
    code = _CHILD.format(module=module, function=function)
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--model", default=os.path.join(REPO, "configs/model/llama3_2_1b.gin"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gin.add_config_file_search_path(REPO)
    gin.parse_config_file(args.model)
    config = ModelConfig(param_dtype="bfloat16", dtype="bfloat16")
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, ckpt_dir, out_dir = (os.path.join(args.workdir, d) for d in ("hf", "ckpt", "hf_out"))
    write_random_hf_checkpoint(config, hf_dir, dtype="bfloat16", max_shard_bytes=2 * 10**9)
    largest = max(entry.hf_size * 2 for entry in mapping.entries(config))
    size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir))
    print(f"model: {config.num_params() / 1e9:.2f}B params, {size / 2**30:.2f} GiB bf16; largest tensor "
          f"{largest / 2**30:.2f} GiB")

    # Disk speed here drifts with the page cache and other load, so the three measurements are interleaved
    # round by round and each is reported as its median.
    runs: dict[str, list] = {"cp": [], "to_orbax": [], "to_hf": []}
    for _ in range(args.rounds):
        for path in (ckpt_dir, out_dir):
            shutil.rmtree(path, ignore_errors=True)
        runs["cp"].append(timed_copy(hf_dir, os.path.join(args.workdir, "hf_copy")))
        runs["to_orbax"].append(run_child("hf_to_orbax", "convert_hf_to_orbax", hf_dir, ckpt_dir))
        runs["to_hf"].append(run_child("orbax_to_hf", "convert_orbax_to_hf", ckpt_dir, out_dir))
    copy_seconds = _median(runs["cp"])
    print(f"cp -r of the safetensors + sync: {copy_seconds:.2f} s (median of {args.rounds}: "
          f"{_listing(runs['cp'])})")
    for name, key in (("HF -> Orbax", "to_orbax"), ("Orbax -> HF", "to_hf")):
        seconds = [r["seconds"] for r in runs[key]]
        ratios = [cp / s for cp, s in zip(runs["cp"], seconds)]
        peak = max(r["peak_rss"] for r in runs[key])
        print(f"{name}: {_median(seconds):.2f} s ({_listing(seconds)}), speed ratio vs cp = "
              f"{copy_seconds / _median(seconds):.2f}x (target >= 0.5; round by round {_listing(ratios, 'x')}); "
              f"peak RSS {peak / 2**30:.2f} GiB = largest tensor + {(peak - largest) / 2**30:.2f} GiB "
              "(target <= +1 GiB)")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _listing(values: list[float], unit: str = "") -> str:
    return ", ".join(f"{v:.2f}{unit}" for v in values)

if __name__ == "__main__":
    main()
