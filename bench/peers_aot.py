"""Our train step vs MaxText's, compiled ahead of time for the same Cloud TPU topologies, measured by one code.

For each row (model, topology) and attention (XLA / splash), both projects' train steps are compiled for the
same topology, global batch, sequence length, micro-batches, remat policy and attention, each in its own
process: MaxText 0.2.5 with its own AOT tool (`maxtext.trainers.pre_train.train_compile`) in its own virtual
environment, ours with `hephaestus_jax.aot`. Both dump their optimised program (XLA's `--xla_dump_to`) and print
their memory analysis; this script reads both the same way and computes per-chip memory (arguments,
temporaries, total), loop-aware FLOPs and HBM bytes (`hlo_cost.program_cost`) and the roofline step time
(`aot.step_report`) for each. Splash/flash kernels are opaque to XLA's cost analysis; both sides get the same
kernel FLOPs (`aot.splash_flops_per_token`).

Both sides run the same compiler, ours (the script checks): jax 0.12.0.1 with libtpu 0.0.52 as measured in
docs/tpu_memory.md (MaxText 0.2.5 needs Python >= 3.12 and resolves libtpu 0.0.52; jax[tpu] itself pins 0.0.50):

    PYENV_VERSION=3.12.1 python3.12 -m venv /work/venv312
    /work/venv312/bin/pip install -e '.[tpu]' jax==0.12.0.1 jaxlib==0.12.0.1
    /work/venv312/bin/pip install --no-deps 'libtpu==0.0.52'
    /work/venv312/bin/python bench/peers_aot.py --maxtext_venv /work/venv_maxtext [--rows 8b-v5p-32] \
        [--attention xla splash] [--sides ours maxtext] [--by_loop]

The MaxText environment is created on first use when `--maxtext_venv` does not exist (`python3.12 -m venv` and
`pip install 'maxtext[tpu]==0.2.5'` pinned to our jax, jaxlib and libtpu; several minutes). One compile runs at a
time; each took 23-63 s on a quiet 2-core host (4-6 minutes on a busy one) and about 2 GiB of RAM.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ATTENTION = {"xla": "dot_product", "splash": "flash"}  # Ours -> MaxText's name for the same attention.
REMAT = {"full": "full"}  # Ours -> MaxText's policy that saves the same (nothing but each layer's input).
COMPILER = ("jax", "jaxlib", "libtpu")  # Both sides must run the same versions of these.
_MODULES = {"maxtext": "jit_train_step", "ours": "jit__step"}  # The train step's XLA module on each side.


@dataclasses.dataclass(frozen=True)
class Row:
    """A model on a topology, with our gin files and MaxText's model name for it."""

    name: str
    model_gin: str
    mesh_gin: str
    topology: str
    maxtext_model: str


ROWS = {row.name: row for row in (
    Row("8b-v5p-32", "llama3_8b", "v5p_32", "v5p-32", "llama3-8b"),
    Row("8b-v5e-256", "llama3_8b", "v5e_256", "v5e-256", "llama3-8b"),
    Row("70b-v5p-128", "llama3_70b", "v5p_128", "v5p-128", "llama3-70b"),
)}


def gin_setup(row: Row, attention: str) -> tuple[list[str], list[str]]:
    """Our gin files and bindings for a row: stage I (512 x 8192, 16 micro-batches), full remat, `attention`."""
    files = [str(REPO / "configs/stage1_cpt.gin"), str(REPO / f"configs/model/{row.model_gin}.gin"),
             str(REPO / f"configs/mesh/{row.mesh_gin}.gin")]
    params = [f"ModelConfig.attention_impl = '{attention}'", "ModelConfig.remat_policy = 'full'",
              "TrainConfig.batch_size = 512", "TrainConfig.grad_accum_steps = 16", "DataConfig.seq_len = 8192"]
    return files, params


def maxtext_args(configs, row: Row, num_chips: int) -> list[str]:
    """MaxText's train_compile arguments for the same step as our `configs` on `num_chips` chips: same global
    batch, sequence length, micro-batches, mesh (data x fsdp x tensor), remat and attention."""
    model, train, mesh = configs.model, configs.train, configs.mesh
    if model.remat_policy not in REMAT or model.attention_impl not in ATTENTION:
        raise ValueError(f"no MaxText equivalent of remat_policy {model.remat_policy!r} / attention_impl "
                         f"{model.attention_impl!r} (known: {sorted(REMAT)} / {sorted(ATTENTION)})")
    micro_rows = train.batch_size // train.grad_accum_steps
    return [f"compile_topology={row.topology}", f"compile_topology_num_slices={mesh.num_slices}",
            f"model_name={row.maxtext_model}", f"per_device_batch_size={micro_rows / num_chips:g}",
            f"max_target_length={configs.data.seq_len}", f"gradient_accumulation_steps={train.grad_accum_steps}",
            f"remat_policy={REMAT[model.remat_policy]}", f"attention={ATTENTION[model.attention_impl]}",
            f"ici_data_parallelism={mesh.data}", f"ici_fsdp_parallelism={mesh.fsdp}",
            f"ici_tensor_parallelism={mesh.tensor}",
            # Lets a mesh axis span part of a physical one (tensor 8 on 16x16, 2 on 4x4x4), as ours does.
            "allow_split_physical_axes=true", "dataset_type=synthetic", "enable_checkpointing=false"]


# ------------------------------------------------------------------------- reading a compile's output


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """The `*_in_bytes` fields of `compiled.memory_analysis()`, as a compile printed them."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int
    peak_memory_in_bytes: int | None = None  # jax >= 0.11 does not print it (MaxText's printout lacks it).


def parse_compile_output(text: str) -> tuple[MemoryStats, dict[str, float]]:
    """The memory analysis and XLA's cost analysis (flops, bytes accessed) from a compile's printout:
    `Memory analysis: CompiledMemoryStats(argument_size_in_bytes=..., ...)` and `Cost analysis: {'flops': ...}`
    (as MaxText's train_compile prints them). ValueError naming what is missing."""
    memory_line = re.search(r"^Memory analysis: (.*)$", text, re.M)
    cost_line = re.search(r"^Cost analysis: (.*)$", text, re.M)
    if memory_line is None or cost_line is None:
        raise ValueError("compile output has no 'Memory analysis:' and 'Cost analysis:' lines")
    sizes = {name: int(value) for name, value in re.findall(r"\b(\w+_in_bytes)=(\d+)", memory_line.group(1))}
    fields = [field.name for field in dataclasses.fields(MemoryStats) if field.name in sizes
              or field.default is dataclasses.MISSING]
    missing = [field for field in fields if field not in sizes]
    if missing:
        raise ValueError(f"'Memory analysis:' line lacks {missing}: {memory_line.group(1)[:200]}")
    costs = {name: float(value) for name, value in
             re.findall(r"'(flops|bytes accessed)': ([-+\d.eE]+|inf|nan)", cost_line.group(1))}
    if set(costs) != {"flops", "bytes accessed"}:
        raise ValueError(f"'Cost analysis:' line lacks 'flops' or 'bytes accessed': {cost_line.group(1)[:200]}")
    return MemoryStats(**{field: sizes[field] for field in fields}), costs


def format_compile_output(memory, costs: dict[str, float]) -> str:
    """The two lines parse_compile_output reads, from a memory analysis and a cost analysis."""
    sizes = ", ".join(f"{field.name}={getattr(memory, field.name)}" for field in dataclasses.fields(MemoryStats))
    return (f"Memory analysis: CompiledMemoryStats({sizes})\n"
            f"Cost analysis: {{'flops': {costs['flops']!r}, 'bytes accessed': {costs['bytes accessed']!r}}}")


def dumped_program(dump_dir: str, module: str) -> str:
    """The optimised HLO text of XLA module `module` from an `--xla_dump_to` directory (the largest, when it was
    compiled more than once). FileNotFoundError naming the directory when there is none."""
    paths = [path for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
             if f".{module}." in os.path.basename(path)]
    if not paths:
        raise FileNotFoundError(f"{dump_dir}: no optimised HLO of module {module} (*.{module}.*"
                                f"after_optimizations.txt)")
    return Path(max(paths, key=os.path.getsize)).read_text()


def dump_env(dump_dir: str, module: str) -> dict[str, str]:
    """The environment of a compile that dumps module `module`'s HLO text into `dump_dir`."""
    flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re={re.escape(module)}$"
    return {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}


# --------------------------------------------------------------------------------------------- compiling


def compile_ours(row: Row, attention: str) -> None:
    """(Child process.) Compile our step for the row and print its memory and cost analyses."""
    from hephaestus_jax import aot, gin_configs  # lazy: the parent process needs no configs to start children

    gin_configs.load_gin(*gin_setup(row, attention))
    configs = gin_configs.build_configs()
    try:
        report = aot.compile_train_step(configs, aot.parse_topology(row.topology, configs.mesh.num_slices))
    except aot.DoesNotFit as e:
        if e.report is None:
            raise
        report = e.report
    memory = MemoryStats(report.argument_bytes, report.output_bytes, report.alias_bytes, report.temp_bytes,
                         report.code_bytes, report.peak_bytes)
    print(format_compile_output(memory, {"flops": report.xla_flops_loops_once,
                                         "bytes accessed": report.xla_bytes_loops_once}))


def compiler_versions(python: str) -> dict[str, str]:
    """The versions of jax, jaxlib and libtpu in the environment of `python`."""
    code = f"import importlib.metadata as m; print(*(m.version(p) for p in {COMPILER!r}))"
    versions = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return dict(zip(COMPILER, versions))


def ensure_maxtext_venv(venv: Path, python312: str, versions: dict[str, str]) -> Path:
    """MaxText's Python, its virtual environment created when missing with MaxText 0.2.5 on the compiler
    `versions` (ours); ValueError when an existing one runs another compiler."""
    python = venv / "bin" / "python"
    if not python.exists():
        pins = ["maxtext[tpu]==0.2.5", *(f"{package}=={version}" for package, version in versions.items())]
        print(f"creating {venv}: {' '.join(pins)} (several minutes)", flush=True)
        subprocess.run([python312, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *pins], check=True)
    theirs = compiler_versions(str(python))
    if theirs != versions:
        raise ValueError(f"{venv} runs {theirs}, ours {versions}: not the same compiler (pip install "
                         f"{' '.join(f'{p}=={v}' for p, v in versions.items())} there)")
    return python


def maxtext_base_config(python: Path) -> str:
    """MaxText's configs/base.yml in its installed package."""
    found = subprocess.run([str(python), "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    return os.path.join(found, "configs", "base.yml")


def run_compile(command: list[str], module: str, dump_dir: Path) -> tuple[str, str, float]:
    """Run one compile with its program dumped into `dump_dir` (its printout goes to `dump_dir`/compile.log):
    (the printout, the optimised HLO text, seconds)."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    # Compiling touches no TPU: it need not own libtpu's lock, which another process on this host may hold.
    env = {**dump_env(str(dump_dir), module), "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    (dump_dir / "compile.log").write_text(result.stdout + result.stderr)
    if result.returncode:
        raise RuntimeError(f"compile failed (exit {result.returncode}; full log {dump_dir / 'compile.log'}):\n"
                           + "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:]))
    return result.stdout, dumped_program(str(dump_dir), module), seconds


# ------------------------------------------------------------------------------------------------ table


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table_line(side: str, report, seconds: float) -> str:
    bound = "compute" if report.compute_seconds >= report.memory_seconds else "HBM"
    return (f"| {side} | {_gib(report.argument_bytes)} | {_gib(report.temp_bytes)} | {_gib(report.total_bytes)} | "
            f"{report.xla_flops + report.kernel_flops:.4g} | {report.cost.bytes_accessed:.4g} | "
            f"{report.step_seconds:.2f} | {100 * report.mfu:.1f}% | {bound} | {seconds:.0f} s |")


def loop_lines(hlo_text: str) -> str:
    """One line per loop of a program (indented by depth): runs per step, and FLOPs and HBM bytes per step."""
    from hephaestus_jax import hlo_cost

    return "\n".join(f"    {'  ' * part.depth}{part.name}: {part.runs} runs, {part.runs * part.flops:.4g} FLOPs, "
                     f"{part.runs * part.bytes_accessed:.4g} HBM bytes"
                     for part in hlo_cost.program_cost_by_loop(hlo_text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--attention", nargs="+", choices=sorted(ATTENTION), default=["xla", "splash"])
    parser.add_argument("--sides", nargs="+", choices=sorted(_MODULES), default=sorted(_MODULES))
    parser.add_argument("--maxtext_venv", type=Path, default=Path("/work/venv_maxtext"))
    parser.add_argument("--python312", default="python3.12", help="creates --maxtext_venv when it is missing")
    parser.add_argument("--out_dir", type=Path, default=Path(tempfile.gettempdir()) / "peers_aot",
                        help="each compile's log and XLA dump (optimised HLO, buffer assignment, memory report)")
    parser.add_argument("--by_loop", action="store_true", help="also print each program's FLOPs and HBM bytes by "
                        "while loop (hlo_cost.program_cost_by_loop): where the two programs differ")
    parser.add_argument("--compile_ours", nargs=2, metavar=("ROW", "ATTENTION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_ours:
        compile_ours(ROWS[args.compile_ours[0]], args.compile_ours[1])
        return 0

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile for topologies; never probe this host for TPUs.
    from hephaestus_jax import aot, gin_configs  # lazy: after JAX_PLATFORMS is set

    versions = compiler_versions(sys.executable)
    # Ours alone (--sides ours) needs no MaxText environment.
    python = ensure_maxtext_venv(args.maxtext_venv, args.python312, versions) if "maxtext" in args.sides else None
    print(f"compiler: {', '.join(f'{p} {v}' for p, v in versions.items())}; ours: {sys.executable}, MaxText: "
          f"{python}; logs and dumps in {args.out_dir}\n")
    print("| row | side | arguments GiB | temporaries GiB | total GiB | FLOPs | HBM bytes | roofline step s | "
          "MFU <= | bound | compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row_name in args.rows:
        row = ROWS[row_name]
        for attention in args.attention:
            gin_configs.load_gin(*gin_setup(row, attention))
            configs = gin_configs.build_configs()
            topology = aot.parse_topology(row.topology, configs.mesh.num_slices)
            mesh = aot.make_topology_mesh(configs, topology)
            commands = {}
            if python is not None:
                commands["maxtext"] = [str(python), "-m", "maxtext.trainers.pre_train.train_compile",
                                       maxtext_base_config(python), *maxtext_args(configs, row, topology.num_chips)]
            if "ours" in args.sides:
                commands["ours"] = [sys.executable, __file__, "--compile_ours", row_name, attention]
            reports = {}
            for side, command in commands.items():
                label = f"{row_name} {attention}"
                try:
                    printout, hlo, seconds = run_compile(command, _MODULES[side],
                                                         args.out_dir / f"{row_name}-{attention}-{side}")
                except RuntimeError as e:
                    print(f"| {label} | {side} | {e} |".replace("\n", " "), flush=True)
                    continue
                memory, costs = parse_compile_output(printout)
                reports[side] = aot.step_report(configs, topology, mesh, memory, hlo, costs)
                print(f"| {label} {table_line(side, reports[side], seconds)}", flush=True)
                if args.by_loop:
                    print(loop_lines(hlo), flush=True)
            if len(reports) == 2:
                ours, theirs = reports["ours"], reports["maxtext"]
                print(f"| {row_name} {attention} | ours / MaxText | {ours.argument_bytes / theirs.argument_bytes:.3f}"
                      f" | {ours.temp_bytes / theirs.temp_bytes:.3f} | {ours.total_bytes / theirs.total_bytes:.3f} | "
                      f"{(ours.xla_flops + ours.kernel_flops) / (theirs.xla_flops + theirs.kernel_flops):.3f} | "
                      f"{ours.cost.bytes_accessed / theirs.cost.bytes_accessed:.3f} | "
                      f"{ours.step_seconds / theirs.step_seconds:.3f} | | | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
