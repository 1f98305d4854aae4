"""Export the params of a hephaestus_jax checkpoint as a Hugging Face model directory (safetensors).

    python tools/convert_orbax_to_hf.py --checkpoint_dir DIR --output_dir DIR [--dtype bfloat16]
        [--max_shard_size 5GB] [--tokenizer_dir DIR] [--step N] [--verify]
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import sys

from hephaestus_jax.convert import verify
from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="converted or training checkpoint directory")
    parser.add_argument("--output_dir", required=True, help="new directory for the Hugging Face model (local or gs://)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="default: the stored dtype")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--tokenizer_dir", help="copy tokenizer files from this directory (local or gs://)")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers before moving the export into place")
    parser.add_argument("--verify_rtol", type=float, default=verify.RELATIVE_TOLERANCE,
                        help="--verify's bound, relative to the largest logit (verify.LogitComparison)")
    args = parser.parse_args(argv)
    if args.verify:
        command.require("hf")
    verifier = verify.Verifier(step=args.step, rtol=args.verify_rtol) if args.verify else None
    try:
        files = convert_orbax_to_hf(args.checkpoint_dir, args.output_dir, step=args.step, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                                    check=verifier)
    except verify.VerificationFailed as e:
        print(e.result)
        print(f"{e}; nothing written at {args.output_dir}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}: {', '.join(files)}")
    if verifier:
        print(verifier.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
