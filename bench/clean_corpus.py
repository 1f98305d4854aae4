"""Corpus cleaning benchmark, run by hand: documents/s per core and peak RSS of every cleaning step, single-process
and Beam (DirectRunner, one worker), on one generated corpus, and the projected worker-hours for 103B tokens.

    python bench/clean_corpus.py [--documents 200000] [--steps filter-quality dedup decontaminate]

The corpus (hephaestus_jax/clean/synthetic.py) has planted exact and near duplicates and BFCL leaks (the
bundled data/eval); the quality model is trained on 4,000 of its documents (agent-style vs prose). Every step
runs over the whole corpus on its own, as `tools/clean_corpus.py <step>` in a child process, once without and
once with `--runner DirectRunner --direct_num_workers 1`; the child's wall time, CPU time (user + system) and
peak RSS are read from `wait4`. Docs/s per core is documents / CPU seconds, which is what one worker core
sustains however loaded the machine is; wall-clock docs/s is printed too.

Projection: Hephaestus-Forge is 103B tokens. The documents that makes is 103e9 / (tokens per document of the
bundled sample, data/forge/*/train-*.jsonl, raw JSON lines, Llama-3 tokenizer); worker-hours per step are that
many documents / (docs/s per core) / 3600. The generated documents are shorter than the sample's, and cleaning
cost grows with text length, so a second projection scales by tokens: 103e9 / (generated tokens per document x
docs/s per core) / 3600. Both are printed; the larger is the one to plan with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hephaestus_jax.clean.decontaminate import bfcl_protected_texts
from hephaestus_jax.clean.jsonl import JsonlWriter
from hephaestus_jax.clean.quality import FastTextParams, train_quality_classifier
from hephaestus_jax.clean.synthetic import synthetic_corpus
from hephaestus_jax.data.vocab import default_tokenizer_path
from hephaestus_jax.json_lines import read_json_lines

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "tools" / "clean_corpus.py"
FORGE_TOKENS = 103e9
STEPS = ("filter-quality", "dedup", "decontaminate")
TRAINING_DOCUMENTS = 4000


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(os.path.dirname(default_tokenizer_path()), "tokenizer.json"))


def tokens_per_document(lines: list[str]) -> float:
    """Mean Llama-3 tokens per line."""
    encodings = _tokenizer().encode_batch(lines, add_special_tokens=False)
    return sum(len(e.ids) for e in encodings) / len(lines)


def sample_lines() -> list[str]:
    lines = []
    for path in sorted((REPO / "data" / "forge").glob("*/train-*.jsonl")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


def eval_files() -> list[str]:
    return [str(p) for p in sorted((REPO / "data" / "eval").glob("BFCL_v3_*.json"))]


def write_corpus(path: Path, documents: int) -> list[str]:
    """Writes the generated corpus; returns the first lines' texts for the tokens-per-document figure."""
    eval_texts = [text for file in eval_files() for line in read_json_lines(file)
                  for text in bfcl_protected_texts(line.value)]
    head = []
    with JsonlWriter(path) as writer:
        for record in synthetic_corpus(documents, seed=0, eval_texts=eval_texts):
            writer.write(record)
            if len(head) < TRAINING_DOCUMENTS:
                head.append(record)
    return head


def train_model(head: list[dict], path: Path) -> None:
    positives = [r["text"] for r in head if r["kind"] == "agent"]
    negatives = [r["text"] for r in head if r["kind"] == "prose"]
    train_quality_classifier(iter(positives), iter(negatives), path, seed=0,
                             params=FastTextParams(epoch=5, dim=32, bucket=200_000))


# Runs the CLI and, at exit, prints the process's own peak RSS: wait4's ru_maxrss would include the RSS this
# (large) parent had when it forked the child, which Linux carries over the exec.
_CHILD = """import atexit, runpy, sys
def _peak():
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
    print(f"peak_rss_kib {hwm}", file=sys.stderr)
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def measure(args: list[str], log: Path) -> dict[str, float | str]:
    """Runs the CLI in a child process: its wall seconds, CPU seconds (wait4), peak RSS and summary line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(CLI), *args], env=env, stdout=output,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if child.returncode:
        raise RuntimeError(f"{args[0]} failed ({log}):\n{text[-3000:]}")
    peak = [line.split()[1] for line in text.splitlines() if line.startswith("peak_rss_kib ")]
    summary = [line for line in text.splitlines() if line.startswith(f"{args[0]}: read")]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": int(peak[-1]) / 2**20,
            "summary": summary[-1]}


def run_step(step: str, runner: str, corpus: Path, model: Path, work: Path) -> dict:
    out = work / f"{step}-{runner}"
    args = [step, "--input", str(corpus), "--output", str(out / "kept.jsonl"), "--report", str(out / "report.json"),
            "--removal_log", str(out / "removed.jsonl"), "--id_field", "id"]
    if step == "filter-quality":
        args += ["--model", str(model)]
    if step == "decontaminate":
        args += ["--eval", *eval_files()]
    if runner == "beam":
        args += ["--num_shards", "8", "--runner", "DirectRunner", "--direct_num_workers", "1"]
    return measure(args, work / f"{step}-{runner}.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=200_000, help="generated corpus size (>= 200k for the docs)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--runners", nargs="+", choices=("single", "beam"), default=["single", "beam"])
    parser.add_argument("--work_dir", help="where the corpus and outputs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clean-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, model = work / "corpus.jsonl", work / "quality.bin"
        head = write_corpus(corpus, args.documents)
        train_model(head, model)
        sample = sample_lines()
        sample_tokens = tokens_per_document(sample)
        generated_tokens = tokens_per_document([json.dumps(r) for r in head[:2000]])
        forge_documents = FORGE_TOKENS / sample_tokens
        print(f"corpus: {args.documents:,} generated documents, {generated_tokens:.0f} tokens/doc "
              f"({corpus.stat().st_size / 2**20:.0f} MiB); bundled sample: {len(sample):,} documents, "
              f"{sample_tokens:.0f} tokens/doc -> Forge's 103B tokens = {forge_documents / 1e6:.0f}M documents; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'step':<15} {'runner':<7} {'wall s':>8} {'CPU s':>8} {'docs/s':>8} {'docs/s/core':>11} "
              f"{'peak RSS':>9} {'worker-h (docs)':>15} {'worker-h (tokens)':>17}")
        rows = []
        for step in args.steps:
            for runner in args.runners:
                row = run_step(step, runner, corpus, model, work)
                per_core = args.documents / row["cpu_s"]
                hours_docs = forge_documents / per_core / 3600
                hours_tokens = FORGE_TOKENS / (per_core * generated_tokens) / 3600
                rows.append({"step": step, "runner": runner, **row, "docs_per_s_per_core": per_core,
                             "worker_hours_by_docs": hours_docs, "worker_hours_by_tokens": hours_tokens})
                print(f"{step:<15} {runner:<7} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f} "
                      f"{args.documents / row['wall_s']:>8.0f} {per_core:>11.0f} {row['peak_rss_gib']:>7.2f} G "
                      f"{hours_docs:>15,.0f} {hours_tokens:>17,.0f}   {row['summary']}", flush=True)
        print(json.dumps({"documents": args.documents, "sample_tokens_per_doc": sample_tokens,
                          "generated_tokens_per_doc": generated_tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
