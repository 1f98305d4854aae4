"""Data pipeline benchmark, run by hand; every figure below is measured side by side in one run.

    python bench/data_pipeline.py [--documents 4000] [--threads 2] [--rounds 3]

(1) The training pipeline from raw Forge JSONL (parse + render + tokenize + pack + mask, through the seqio task
    and the lanes of `train_stream("forge_stage1")`) in tokens/s, as a ratio to a bare `tokenizers` batch encode
    of the same documents' text.
(2) The loader from prepared ArrayRecord shards (written by the Beam pipeline, DirectRunner, also timed) for
    one host of a 4-host job with the Llama-3-8B global batch 512 x 8192, against what one training step of
    that job consumes per host (assumptions printed).

The corpus is built locally from the Python sources (code) and package metadata (text) installed in this
environment, plus tool documentation and trajectories synthesised from that text; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import gin

from hephaestus_jax.config import DataConfig, ForgeFiles
from hephaestus_jax.data import mixtures
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.data.chat_format import forge_renderer
from hephaestus_jax.data.prepare import PrepareConfig, run as run_prepare

MAX_CHARS = 30_000
LLAMA3_8B = dict(params=8.03e9, layers=32, hidden=4096)
V5P_CHIP_BF16_FLOPS = 459e12


def _local_texts(kind: str, limit: int) -> list[str]:
    """Deterministic list of local files' text: 'code' = *.py, 'text' = package METADATA / *.md / *.rst."""
    root = Path(gin.__file__).resolve().parents[1]  # site-packages
    globs = ["**/*.py"] if kind == "code" else ["*.dist-info/METADATA", "**/*.md", "**/*.rst"]
    texts = []
    for pattern in globs:
        for path in sorted(root.glob(pattern)):
            try:
                text = path.read_text(encoding="utf-8")[:MAX_CHARS]
            except (UnicodeDecodeError, OSError):
                continue
            if len(text.strip()) > 200:
                texts.append(text)
            if len(texts) >= limit:
                return texts
    return texts


_ARGUMENT_EXAMPLES = {"string": "x", "integer": 1, "boolean": True}


def _tool(rng: random.Random, words: list[str]) -> dict:
    name = "_".join(rng.sample(words, 2)).lower()
    params = {
        w.lower(): {"type": rng.choice(sorted(_ARGUMENT_EXAMPLES)), "description": " ".join(rng.sample(words, 8))}
        for w in rng.sample(words, rng.randint(1, 4))
    }
    return {"name": name, "description": " ".join(rng.choices(words, k=rng.randint(20, 120))),
            "parameters": {"type": "object", "properties": params, "required": sorted(params)[:1]}}


def _trajectory(rng: random.Random, words: list[str]) -> dict:
    tool = _tool(rng, words)
    required = tool["parameters"]["required"][0]
    arguments = {required: _ARGUMENT_EXAMPLES[tool["parameters"]["properties"][required]["type"]]}
    steps = [{"thought": " ".join(rng.choices(words, k=rng.randint(10, 60))),
              "call": {"name": tool["name"], "arguments": arguments},
              "observation": {"result": " ".join(rng.choices(words, k=rng.randint(10, 80)))}}
             for _ in range(rng.randint(1, 4))]
    return {"query": " ".join(rng.choices(words, k=rng.randint(8, 40))), "tools": [tool], "steps": steps,
            "final_answer": " ".join(rng.choices(words, k=rng.randint(10, 60)))}


def build_corpus(root: Path, documents: int, seed: int = 0) -> None:
    """A Forge tree under root: {component}/train-0000i-of-00004.jsonl for the four CPT components."""
    rng = random.Random(seed)
    code = _local_texts("code", documents // 3)
    text = _local_texts("text", documents // 3)
    words = sorted({w for t in text[:200] for w in t.split() if w.isalpha() and 3 < len(w) < 14})
    records = {
        "code": [{"text": t, "language": "python"} for t in code],
        "text": [{"text": t} for t in text],
        "tool_docs": [_tool(rng, words) for _ in range(documents // 6)],
        "trajectories": [_trajectory(rng, words) for _ in range(documents // 6)],
    }
    for component, items in records.items():
        directory = root / component
        directory.mkdir(parents=True)
        for shard in range(4):
            with open(directory / f"train-{shard:05d}-of-00004.jsonl", "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in items[shard::4])


def _data(data_dir: Path, pattern: str) -> DataConfig:
    return DataConfig(files=ForgeFiles(data_dir=str(data_dir), pattern=pattern))


def _consume(stream, tokens_wanted: int) -> tuple[int, float]:
    """Pairs (non-padding) taken from the stream until at least tokens_wanted, and the seconds it took."""
    start, pairs = time.perf_counter(), 0
    while pairs < tokens_wanted:
        batch = next(stream)
        pairs += int((batch["segment_ids"] > 0).sum())
    return pairs, time.perf_counter() - start


def bench_pipeline_vs_tokenizer(raw: Path, threads: int, rounds: int) -> None:
    """Alternates the bare tokenizer and the pipeline `rounds` times (other load on the machine varies) and
    compares the best round of each."""
    data = _data(raw, "{data_dir}/{component}/{split}-*.jsonl*")
    renderer = forge_renderer()
    vocab = renderer.vocab
    texts = []
    for component in mixtures.CPT_COMPONENTS:
        documents = mixtures.documents(data, mixtures.task_name(component), "train", renderer)
        texts.extend(vocab.decode(documents[i].tokens.tolist()) for i in range(len(documents)))
    hf_tokenizer, tiktoken_encoding = _bare_tokenizers()
    bare_rates, tiktoken_rates, rates = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        bare_tokens = sum(len(e.ids) for e in hf_tokenizer.encode_batch(texts, add_special_tokens=False))
        bare_rates.append(bare_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        tiktoken_tokens = sum(map(len, tiktoken_encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count())))
        tiktoken_rates.append(tiktoken_tokens / (time.perf_counter() - start))
        # Fresh sources: nothing parsed or rendered yet.
        stream = mixtures.train_stream(data, StreamSpec(global_rows=64, seq_len=2048, num_threads=threads),
                                       renderer=renderer)
        pairs, seconds = _consume(stream, bare_tokens)
        stream.close()
        rates.append(pairs / seconds)
    print(f"(1) corpus: {len(texts):,} documents, {bare_tokens:,} tokens; best of {rounds} alternating rounds; "
          f"pipeline vocabulary: {vocab}")
    print(f"    bare tokenizers encode_batch, tokenizer.json (all cores): {max(bare_rates):12,.0f} tokens/s")
    print(f"    bare tiktoken encode_ordinary_batch, tokenizer.model:     {max(tiktoken_rates):12,.0f} tokens/s")
    print(f"    pipeline parse+render+tokenize+pack, {threads} thread(s):       {max(rates):12,.0f} tokens/s")
    print(f"    ratio to bare tokenizers {max(rates) / max(bare_rates):.2f}x (target >= 0.5x; per round "
          f"{', '.join(f'{r / b:.2f}x' for r, b in zip(rates, bare_rates))}), "
          f"to bare tiktoken {max(rates) / max(tiktoken_rates):.2f}x")


def _bare_tokenizers():
    """The shipped Llama-3 tokenizer as a bare `tokenizers.Tokenizer` (tokenizer.json) and `tiktoken.Encoding`
    (tokenizer.model), for baselines."""
    import tiktoken
    import tokenizers
    from tiktoken.load import load_tiktoken_bpe

    from hephaestus_jax.data.vocab import LLAMA3_SPLIT_PATTERN, default_tokenizer_path

    json_path = default_tokenizer_path()
    ranks = load_tiktoken_bpe(os.path.join(os.path.dirname(json_path), "tokenizer.model"))
    encoding = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return tokenizers.Tokenizer.from_file(json_path), encoding


def step_seconds(mfu: float, global_tokens: int, seq_len: int, chips: int) -> float:
    flops_per_token = 6 * LLAMA3_8B["params"] + 6 * LLAMA3_8B["layers"] * LLAMA3_8B["hidden"] * seq_len
    return flops_per_token * global_tokens / (chips * V5P_CHIP_BF16_FLOPS * mfu)


def bench_loader(raw: Path, prepared: Path, threads: int) -> None:
    start = time.perf_counter()
    run_prepare(PrepareConfig(input_dir=str(raw), output_dir=str(prepared), components=mixtures.CPT_COMPONENTS,
                              splits=("train",), num_shards=4))
    prepare_seconds = time.perf_counter() - start
    stats = json.loads((prepared / "stats.json").read_text())["components"]
    prepared_tokens = sum(split["train"]["tokens"] for split in stats.values())
    print(f"(2) Beam DirectRunner prepare: {prepared_tokens:,} tokens in {prepare_seconds:.1f} s "
          f"({prepared_tokens / prepare_seconds:,.0f} tokens/s on this machine)")

    global_rows, seq_len, hosts, chips, mfu = 512, 8192, 4, 16, 0.5
    data = _data(prepared, "{data_dir}/{component}/{split}-*.arrayrecord")
    stream = mixtures.train_stream(data, StreamSpec(global_rows=global_rows, seq_len=seq_len, process_count=hosts,
                                                    num_threads=threads))
    next(stream)  # open readers, start the prefetch thread
    per_host_step = global_rows * seq_len // hosts
    pairs, seconds = _consume(stream, 3 * per_host_step)
    stream.close()
    rate = pairs / seconds
    step = step_seconds(mfu, global_rows * seq_len, seq_len, chips)
    need = per_host_step / step
    print(f"    loader from prepared shards, {threads} thread(s), {global_rows // hosts} rows x {seq_len}: "
          f"{rate:12,.0f} tokens/s per host")
    print(f"    Llama-3-8B on v5p-32 ({chips} chips, {hosts} hosts), global batch {global_rows}x{seq_len}: "
          f"{per_host_step:,} tokens/host/step; at {mfu:.0%} MFU of {V5P_CHIP_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 "
          f"per chip and 6N + 6*L*d*S FLOPs/token a step takes {step:.1f} s -> {need:,.0f} tokens/s per host")
    print(f"    loader / consumption: {rate / need:.1f}x (target >= 10x); "
          f"one host's batch is ready in {per_host_step / rate:.2f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=4000, help="corpus size (documents)")
    parser.add_argument("--threads", type=int, default=2, help="row-packing threads of the training stream")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of measurement (1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        build_corpus(raw, args.documents)
        bench_pipeline_vs_tokenizer(raw, args.threads, args.rounds)
        bench_loader(raw, prepared, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
