"""The paper's effect at toy scale: SFT only vs stage-I CPT + SFT, same model and init, on the bundled sample.

    python tools/toy_replication.py [--output_dir runs/toy_replication] [--cpt_steps 400] [--sft_steps 200]
        [--doc docs/toy_replication.md]

Both arms start from the same random-init Hugging Face checkpoint of a small Llama-3-architecture model; arm B
first continually pre-trains on the stage-I mixture (tool docs, trajectories, code, text). Both then get the
same SFT. Measured on held-out data whose APIs never appear in training: loss per Forge component and
BFCL-style function-calling accuracy (data/eval). Writes a CSV/JSON, a plot, and the markdown report `--doc`.
Every step is a subprocess of the project's CLIs; finished steps are reused when the command is rerun.
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_BINDINGS = ("ModelConfig.hidden_size = 128", "ModelConfig.intermediate_size = 384", "ModelConfig.num_layers = 4",
                  "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2", "ModelConfig.head_dim = 32")
COMMON = ("configs/model/tiny.gin", "configs/mesh/cpu.gin")
EVAL_MIXTURES = ("forge_stage1", "forge_sft")


def _run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO_ROOT, check=True)


def _train(output: str, stage_file: str, steps: int, learning_rate: float, init: str, init_hf: bool) -> str:
    checkpoints = os.path.join(output, "checkpoints")
    bindings = [*MODEL_BINDINGS, "ForgeFiles.data_dir = 'data/forge'", "DataConfig.seq_len = 512",
                "ModelConfig.dtype = 'float32'", "ModelConfig.remat_policy = 'none'", "TrainConfig.batch_size = 4",
                "TrainConfig.grad_accum_steps = 1", f"TrainConfig.num_steps = {steps}", "TrainConfig.log_every = 25",
                f"TrainConfig.checkpoint_every = {steps}", "TrainConfig.eval_every = 0",
                f"TrainConfig.output_dir = {output!r}", "TrainConfig.init_from = None", "TrainConfig.init_from_hf = None",
                f"OptimizerConfig.learning_rate = {learning_rate}", f"OptimizerConfig.warmup_steps = {steps // 10}",
                "OptimizerConfig.weight_decay = 0.0",
                f"TrainConfig.init_from_hf = {init!r}" if init_hf else f"TrainConfig.init_from = {init!r}"]
    args = ["-m", "hephaestus_jax.train", "--gin_file", stage_file]
    for path in COMMON:
        args += ["--gin_file", path]
    for binding in bindings:
        args += ["--gin_param", binding]
    _run(*args)
    return checkpoints


def _evaluate(checkpoints: str, out_dir: str) -> dict:
    """Held-out loss per component and BFCL accuracy of a final checkpoint (cached in out_dir)."""
    results_path = os.path.join(out_dir, "results.json")
    if os.path.exists(results_path):
        with open(results_path) as f:
            return json.load(f)
    losses = {}
    for mixture in EVAL_MIXTURES:
        path = os.path.join(out_dir, f"loss_{mixture}.json")
        _run("-m", "hephaestus_jax.evaluate", "loss", "--gin_file", "configs/quickstart.gin", "--gin_param",
             "ForgeFiles.data_dir = 'data/forge'", "--checkpoint_dir", checkpoints, "--mixture", mixture,
             "--seq_len", "512", "--batch_size", "4", "--output", path)
        with open(path) as f:
            losses.update({k: v for k, v in json.loads(f.readline()).items() if k.startswith("eval/loss/")})
    bfcl_path = os.path.join(out_dir, "bfcl.json")
    _run("-m", "hephaestus_jax.evaluate", "function_calling", "--checkpoint_dir", checkpoints, "--dataset", "data/eval",
         "--max_new_tokens", "96", "--batch_size", "16", "--output", bfcl_path)
    with open(bfcl_path) as f:
        report = json.load(f)["report"]
    results = {"losses": losses, "bfcl": report}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    return results


def _plot(arms: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    components = sorted({key for arm in arms.values() for key in arm["losses"] if key != "eval/loss"})
    categories = sorted({c for arm in arms.values() for c in arm["bfcl"]["categories"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        left.bar([j + i * width for j in range(len(components))],
                 [arms[name]["losses"].get(c, float("nan")) for c in components], width, label=name)
        right.bar([j + i * width for j in range(len(categories))],
                  [arms[name]["bfcl"]["categories"][c]["accuracy"] for c in categories], width, label=name)
    left.set_xticks([j + width / 2 for j in range(len(components))],
                    [c.removeprefix("eval/loss/forge_") for c in components], rotation=30)
    left.set_ylabel("held-out loss (nats/token)")
    right.set_xticks([j + width / 2 for j in range(len(categories))], categories, rotation=30)
    right.set_ylabel("BFCL-style accuracy (unseen APIs)")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _markdown(arms: dict[str, dict], args: argparse.Namespace, plot: str) -> str:
    names = list(arms)
    components = sorted({key for arm in arms.values() for key in arm["losses"]})
    categories = sorted({c for arm in arms.values() for c in arm["bfcl"]["categories"]})
    lines = [
        "# The Hephaestus effect at toy scale",
        "",
        "Produced by `python tools/toy_replication.py` (this file is its output; rerun it to reproduce).",
        "",
        f"A Llama-3-architecture model ({', '.join(b.split('.')[1] for b in MODEL_BINDINGS)}; the real 128K "
        "Llama-3 vocabulary, tied embeddings) starts twice from the same random-init Hugging Face checkpoint:",
        "",
        f"- **SFT only**: {args.sft_steps} SFT steps on the bundled SFT sample (loss on assistant turns);",
        f"- **CPT + SFT**: {args.cpt_steps} stage-I CPT steps on the bundled Forge mixture (agent:code:text = 1:1:1), "
        f"then the same {args.sft_steps} SFT steps.",
        "",
        "4 rows x 512 tokens a step, float32, CPU. Evaluation uses only APIs that never appear in training "
        "(the sample's held-out split and `data/eval`, in BFCL's file format).",
        "",
        "## Held-out loss (nats per target token; lower is better)",
        "",
        "| component | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for component in components:
        lines.append(f"| {component.removeprefix('eval/loss/')} | "
                     + " | ".join(f"{arms[n]['losses'].get(component, float('nan')):.3f}" for n in names) + " |")
    lines += ["", "## Function calling on unseen APIs (BFCL-style AST accuracy)", "",
              "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for category in categories:
        cells = []
        for n in names:
            c = arms[n]["bfcl"]["categories"][category]
            cells.append(f"{c['accuracy']:.1%} ({c['correct']}/{c['total']})")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| **overall (mean over categories)** | "
                 + " | ".join(f"{arms[n]['bfcl']['macro_accuracy']:.1%}" for n in names) + " |")
    lines += ["", f"![held-out loss and accuracy]({os.path.relpath(plot, os.path.join(REPO_ROOT, 'docs'))})", "",
              "## Reading it", "", args.reading or "(see the numbers above)", ""]
    return "\n".join(lines)


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/toy_replication")
    parser.add_argument("--cpt_steps", type=int, default=400)
    parser.add_argument("--sft_steps", type=int, default=200)
    parser.add_argument("--doc", default="docs/toy_replication.md")
    parser.add_argument("--reading", default="", help="an interpretation paragraph to put under the tables")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    out = os.path.abspath(args.output_dir)
    init = os.path.join(out, "hf_random_init")
    if not os.path.exists(init):
        import gin

        from hephaestus_jax import gin_configs
        from hephaestus_jax.config import ModelConfig
        from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

        gin_configs.load_gin(list(COMMON), list(MODEL_BINDINGS))
        write_random_hf_checkpoint(ModelConfig(), init)
        gin.clear_config()

    sft_only = _train(os.path.join(out, "sft_only"), "configs/sft.gin", args.sft_steps, 1e-3, init, init_hf=True)
    cpt = _train(os.path.join(out, "cpt"), "configs/stage1_cpt.gin", args.cpt_steps, 2e-3, init, init_hf=True)
    cpt_sft = _train(os.path.join(out, "cpt_sft"), "configs/sft.gin", args.sft_steps, 1e-3, cpt, init_hf=False)
    arms = {"SFT only": _evaluate(sft_only, os.path.join(out, "sft_only")),
            "CPT + SFT": _evaluate(cpt_sft, os.path.join(out, "cpt_sft"))}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(arms, f, indent=2)
    plot = os.path.join(REPO_ROOT, "docs", "toy_replication.png")
    _plot(arms, plot)
    with open(os.path.join(REPO_ROOT, args.doc), "w") as f:
        f.write(_markdown(arms, args, plot))
    print(f"wrote {args.doc} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
