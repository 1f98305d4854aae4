"""Compile the real train step for a Cloud TPU topology on this machine (no TPU needed) and report per chip:
memory (arguments, outputs, temporaries, generated code, total vs HBM), FLOPs (XLA's and the model count), and
a roofline step time and MFU.

    python tools/aot_compile.py --gin_file configs/stage1_cpt.gin --gin_file configs/model/llama3_8b.gin \
        --gin_file configs/mesh/v5p_32.gin --topology v5p-32 [--num_slices N] [--gin_param 'B.x=1' ...]

The configuration is built exactly as training builds it (the same gin files and bindings). Exit status: 0 it
fits, 1 it does not fit in HBM, 2 a configuration error (topology name, mesh, bindings). Needs the TPU extra
(libtpu): pip install -e '.[tpu]'. See docs/tpu_memory.md.

--search compiles remat policies x micro-batch counts (grad_accum_steps) instead, skipping those that cannot win,
prints a table and the gin bindings of the fastest roofline step with >= 20% HBM headroom (hephaestus_jax/
aot_search.py); --remat and --grad_accum restrict the candidates, --max_compiles time-boxes it. Exit status 1:
no candidate fits with the headroom.
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile for the topology; never probe this host for TPU chips.


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], required=True, help="gin config (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'TrainConfig.seed=1'")
    parser.add_argument("--topology", required=True, help="Cloud TPU type (v5p-32, v5e-256, v4-128, v6e-64) "
                                                          "or libtpu's form (v5p:2x2x4)")
    parser.add_argument("--num_slices", type=int, help="slices over DCN (default: the mesh's dcn_data*dcn_fsdp)")
    parser.add_argument("--search", action="store_true", help="search remat policies x micro-batch counts")
    parser.add_argument("--remat", type=_names, help="--search: these remat policies only (comma-separated)")
    parser.add_argument("--grad_accum", type=_counts, help="--search: these grad_accum_steps only (e.g. 8,16)")
    parser.add_argument("--min_headroom", type=float, default=0.2, help="--search: HBM fraction left free")
    parser.add_argument("--max_compiles", type=int, help="--search: compile at most this many candidates")
    args = parser.parse_args(argv)

    from hephaestus_jax import aot

    try:
        aot.parse_topology(args.topology)  # A bad name fails before the slow imports below.
        from hephaestus_jax import gin_configs

        gin_configs.load_gin(args.gin_file, args.gin_param)
        configs = gin_configs.build_configs()
        topology = aot.parse_topology(args.topology, args.num_slices or configs.mesh.num_slices)
        if args.search:
            return _search(configs, topology, args)
        report = aot.compile_train_step(configs, topology)
    except aot.DoesNotFit as e:
        print(f"{e}\nDOES NOT FIT: lower TrainConfig.batch_size per chip (raise grad_accum_steps), use a "
              "stronger ModelConfig.remat_policy, or more chips", file=sys.stderr)
        return 1
    print(report.format())
    return 0


def _search(configs, topology, args: argparse.Namespace) -> int:
    """Run the search; print each outcome as it comes (to stderr), then the table and the winner's bindings."""
    from hephaestus_jax import aot, aot_search, sharding

    shards = sharding.batch_shards(aot.make_topology_mesh(configs, topology))
    todo = aot_search.candidates(configs.train.batch_size, shards, args.remat or aot_search.REMAT_ORDER,
                                 args.grad_accum)
    print(f"{topology.name}: {len(todo)} candidates, batch {configs.train.batch_size} over {shards} data x fsdp "
          f"shards, attention {configs.model.attention_impl}", file=sys.stderr)
    outcomes = aot_search.search(
        configs, topology, todo, args.min_headroom, args.max_compiles,
        progress=lambda o: print(aot_search.format_outcome(o, args.min_headroom), file=sys.stderr, flush=True))
    print(aot_search.format_table(outcomes, args.min_headroom))
    return 0 if aot_search.choose(outcomes, args.min_headroom) else 1


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _counts(text: str) -> list[int]:
    try:
        return [int(count) for count in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
