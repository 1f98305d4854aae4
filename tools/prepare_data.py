"""Prepare Forge data offline: raw JSONL(.gz) -> rendered, tokenized, shuffled ArrayRecord shards + stats.json.

    python tools/prepare_data.py --input_dir data/forge --output_dir /tmp/forge-prepared [--seed 0] [--num_shards 8]
        [--components tool_docs code ...] [--splits train validation] [--tokenizer PATH] [--skip_bad_records]
        [Beam options, e.g. --runner DataflowRunner --project P --region R --temp_location gs://...]

Reads {input_dir}/{component}/{split}-*.jsonl* and writes {output_dir}/{component}/{split}-SSSSS-of-NNNNN.arrayrecord.
Unrecognised options are passed to Beam, so the same command runs locally (DirectRunner) or on Dataflow/Flink/Spark.
Train on the result with `ForgeFiles.pattern = "{data_dir}/{component}/{split}-*.arrayrecord"`. Prepare the
stage-II seed subset with a second run (--input_dir .../seed --output_dir .../seed).
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import json
import sys

from hephaestus_jax.config import CHAT_FORMAT_NAMES
from hephaestus_jax.data import forge


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="raw Forge tree: {component}/{split}-*.jsonl[.gz]")
    parser.add_argument("--output_dir", required=True, help="where shards and stats.json go (local or gs://)")
    parser.add_argument("--components", nargs="+", default=list(forge.COMPONENTS), choices=forge.COMPONENTS)
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (the output is a function of it)")
    parser.add_argument("--num_shards", type=int, default=8, help="shards per component and split")
    parser.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model (default: the shipped Llama-3 one)")
    parser.add_argument("--chat_format", choices=CHAT_FORMAT_NAMES, help="conversation format "
                        "(default: the tokenizer's own chat template, else the fallback its special tokens match)")
    parser.add_argument("--skip_bad_records", action="store_true", help="skip and count malformed lines")
    args, beam_args = parser.parse_known_args(argv)
    command.require("data", "apache_beam")
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from hephaestus_jax.data.prepare import STATS_FILE, PrepareConfig, run

    config = PrepareConfig(
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        components=tuple(args.components),
        splits=tuple(args.splits),
        seed=args.seed,
        num_shards=args.num_shards,
        tokenizer_path=args.tokenizer,
        chat_format=args.chat_format,
        skip_bad_records=args.skip_bad_records,
    )
    run(config, PipelineOptions(beam_args))
    stats_path = f"{args.output_dir.rstrip('/')}/{STATS_FILE}"
    with FileSystems.open(stats_path) as f:
        stats = json.load(f)
    for component, splits in sorted(stats["components"].items()):
        for split, row in sorted(splits.items()):
            print(f"{component:>12} {split:<10} {row['documents']:>10,} docs {row['tokens']:>14,} tokens "
                  f"{row.get('skipped_bad_records', 0):>6,} skipped")
    print(f"wrote {stats_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
