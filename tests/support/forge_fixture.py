"""A small synthetic Forge tree (every component, train/validation, seed subset) for data tests."""

import gzip
import json
import random

WORDS = "agent tool call weather city answer query function result value list map code text data".split()
TOOL = {"name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _sentence(rng, low=3, high=60):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _record(component, rng):
    if component == "tool_docs":
        return {**TOOL, "name": f"tool_{rng.randint(0, 10**6)}", "description": _sentence(rng)}
    if component == "trajectories":
        return {"query": _sentence(rng), "tools": [TOOL], "final_answer": _sentence(rng),
                "steps": [{"thought": _sentence(rng), "call": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                           "observation": {"temp": rng.randint(-5, 30)}}]}
    if component == "code":
        return {"text": f"def f_{rng.randint(0, 999)}():\n    return '{_sentence(rng)}'\n", "language": "python"}
    if component == "text":
        return {"text": _sentence(rng, 3, 200)}
    return {"messages": [{"role": "system", "content": _sentence(rng, 2, 8)},
                         {"role": "user", "content": _sentence(rng)},
                         {"role": "assistant", "content": _sentence(rng)}]}


def write_forge_fixture(root, seed=0, files_per_split=2, records_per_file=(7, 5)):
    """A small Forge tree: {root}/{component}/{split}-0000i-of-0000n.jsonl (the last file gzipped) for every
    component and split, and {root}/seed/{tool_docs,trajectories}/... Returns {(subdir, component, split): n}."""
    rng = random.Random(seed)
    counts = {}
    layout = [("", c) for c in ("tool_docs", "trajectories", "code", "text", "sft")]
    layout += [("seed/", c) for c in ("tool_docs", "trajectories")]
    for subdir, component in layout:
        directory = root / f"{subdir}{component}"
        directory.mkdir(parents=True)
        for split, per_file in zip(("train", "validation"), records_per_file):
            counts[(subdir, component, split)] = 0
            for index in range(files_per_split):
                lines = "".join(json.dumps(_record(component, rng)) + "\n" for _ in range(per_file))
                name = f"{split}-{index:05d}-of-{files_per_split:05d}.jsonl"
                if index == files_per_split - 1:
                    (directory / f"{name}.gz").write_bytes(gzip.compress(lines.encode()))
                else:
                    (directory / name).write_text(lines)
                counts[(subdir, component, split)] += per_file
    return counts
