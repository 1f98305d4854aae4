"""Build the bundled Forge sample: `{output_dir}/forge/...` (every component, train and validation, the stage-II
seed subset) and `{output_dir}/eval/...` (BFCL-format function-calling questions on held-out APIs).

About one API in five is held out: its documentation, trajectories, SFT conversations and the whole BFCL set use
only held-out APIs, and no training record mentions one, so evaluation measures generalisation to unseen tools.
Every record is validated with the Forge reader's own parser before it is written. The output is a function of
the seed and the Python version (the APIs, their results and the source files are the standard library's).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hephaestus_jax.data import forge
from hephaestus_jax.sample import agent_records, python_apis, stdlib_corpus
from hephaestus_jax.sample.python_apis import Api

HELD_OUT_ONE_IN = 5
MIN_EXAMPLES = 3  # an API needs this many distinct successful calls to serve parallel questions


@dataclass(frozen=True)
class SampleSizes:
    """How much of each component to write (records per API, bytes of code and text, questions per category)."""

    trajectories_per_api: int = 6
    sft_per_api: int = 6
    heldout_trajectories_per_api: int = 3
    heldout_sft_per_api: int = 2
    code_bytes: int = 1_200_000
    heldout_code_bytes: int = 150_000
    text_bytes: int = 600_000
    heldout_text_bytes: int = 80_000
    questions_per_category: int = 30


def split_apis(apis: Sequence[Api]) -> tuple[list[Api], list[Api]]:
    """(training APIs, held-out APIs), decided by a hash of each name."""
    usable = [a for a in apis if len(a.examples) >= MIN_EXAMPLES]
    held_out = [a for a in usable if stdlib_corpus.is_held_out(a.name, HELD_OUT_ONE_IN)]
    return [a for a in usable if a not in held_out], held_out


def is_seed_quality(api: Api) -> bool:
    """Stage II's high-quality subset: documentation that describes every parameter in its own words."""
    return len(api.doc) >= 120 and all(p.documented for p in api.parameters)


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(map(str, (seed, *parts))))  # str seeds are hashed with SHA-512: stable


def _records_per_api(apis: Sequence[Api], count: int, make: Callable[[Api, Sequence[Api], random.Random], dict],
                     seed: int, label: str) -> list[tuple[Api, dict]]:
    return [(api, make(api, apis, _rng(seed, label, api.name, i))) for api in apis for i in range(count)]


def _has_error(trajectory: dict[str, Any]) -> bool:
    return any(isinstance(s.get("observation"), dict) and "error" in s["observation"] for s in trajectory["steps"])


class _Writer:
    """Writes JSONL files under a root, validating Forge records, and counts what it wrote."""

    def __init__(self, root: str):
        self.root = root
        self.files: dict[str, dict[str, int]] = {}

    def jsonl(self, relative: str, records: Sequence[dict], component: str | None = None) -> None:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lines = []
        for number, record in enumerate(records, start=1):
            line = json.dumps(record, ensure_ascii=False, sort_keys=False)
            if component is not None:
                forge.parse_json_record(line, component, f"{relative}:{number}")
            lines.append(line + "\n")
        data = "".join(lines).encode()
        with open(path, "wb") as f:
            f.write(data)
        self.files[relative] = {"records": len(records), "bytes": len(data)}


def build_sample(output_dir: str, seed: int = 0, sizes: SampleSizes = SampleSizes()) -> dict[str, Any]:
    """Write the sample into output_dir/forge and output_dir/eval (replacing them) and output_dir/manifest.json;
    returns the manifest. The tree is written next to the output and moved into place whole."""
    apis = python_apis.discover(seed)
    train_apis, heldout_apis = split_apis(apis)
    staging = tempfile.mkdtemp(prefix=".sample-", dir=os.path.dirname(os.path.abspath(output_dir)) or ".")
    writer = _Writer(staging)
    for split, split_apis_, trajectories, sft in (
            ("train", train_apis, sizes.trajectories_per_api, sizes.sft_per_api),
            ("validation", heldout_apis, sizes.heldout_trajectories_per_api, sizes.heldout_sft_per_api)):
        docs = [agent_records.tool_doc_record(api) for api in split_apis_]
        writer.jsonl(f"forge/tool_docs/{split}-00000-of-00001.jsonl", docs, "tool_docs")
        paths = _records_per_api(split_apis_, trajectories, agent_records.trajectory_record, seed, f"traj-{split}")
        writer.jsonl(f"forge/trajectories/{split}-00000-of-00001.jsonl", [r for _, r in paths], "trajectories")
        convs = _records_per_api(split_apis_, sft, agent_records.sft_record, seed, f"sft-{split}")
        writer.jsonl(f"forge/sft/{split}-00000-of-00001.jsonl", [r for _, r in convs], "sft")
        seed_apis = {api.name for api in split_apis_ if is_seed_quality(api)}
        writer.jsonl(f"forge/seed/tool_docs/{split}-00000-of-00001.jsonl",
                     [d for d in docs if d["name"] in seed_apis], "tool_docs")
        writer.jsonl(f"forge/seed/trajectories/{split}-00000-of-00001.jsonl",
                     [r for api, r in paths if api.name in seed_apis and not _has_error(r)], "trajectories")
    _write_corpus(writer, sizes)
    _write_bfcl(writer, heldout_apis, seed, sizes.questions_per_category)
    manifest = {
        "seed": seed, "python": platform.python_version(), "sizes": sizes.__dict__,
        "apis": {"train": [a.name for a in train_apis], "held_out": [a.name for a in heldout_apis]},
        "files": dict(sorted(writer.files.items())),
    }
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.makedirs(output_dir, exist_ok=True)
    for name in ("forge", "eval", "manifest.json"):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging)
    return manifest


def _write_corpus(writer: _Writer, sizes: SampleSizes) -> None:
    code, text = stdlib_corpus.code_documents(), stdlib_corpus.text_documents()
    for split, held_out in (("train", False), ("validation", True)):
        code_budget = sizes.heldout_code_bytes if held_out else sizes.code_bytes
        text_budget = sizes.heldout_text_bytes if held_out else sizes.text_bytes
        writer.jsonl(f"forge/code/{split}-00000-of-00001.jsonl",
                     [{"text": d.text, "language": "python", "path": d.name, "license": stdlib_corpus.LICENSE}
                      for d in stdlib_corpus.take(code, held_out, code_budget)], "code")
        writer.jsonl(f"forge/text/{split}-00000-of-00001.jsonl",
                     [{"text": d.text, "source": d.name, "meta": {"license": stdlib_corpus.LICENSE}}
                      for d in stdlib_corpus.take(text, held_out, text_budget)], "text")


def _write_bfcl(writer: _Writer, apis: Sequence[Api], seed: int, per_category: int) -> None:
    for category in agent_records.BFCL_CATEGORIES:
        questions, answers = [], []
        for index in range(per_category):
            rng = _rng(seed, "bfcl", category, index)
            api = apis[index % len(apis)]
            question, answer = agent_records.bfcl_question(category, index, api, apis, rng)
            questions.append(question)
            if answer is not None:
                answers.append(answer)
        writer.jsonl(f"eval/BFCL_v3_{category}.json", questions)
        if answers:
            writer.jsonl(f"eval/possible_answer/BFCL_v3_{category}.json", answers)
