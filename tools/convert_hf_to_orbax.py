"""Convert a Hugging Face Llama-3-family checkpoint (safetensors) into a hephaestus_jax Orbax checkpoint.

    python tools/convert_hf_to_orbax.py --hf_dir DIR --output_dir DIR [--dtype bfloat16|float32] [--verify]
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import sys

from hephaestus_jax.convert import verify
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="directory with config.json and *.safetensors (local or gs://)")
    parser.add_argument("--output_dir", required=True, help="new checkpoint directory (local or gs://)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="stored param dtype (default: config.json's)")
    parser.add_argument("--no_scan_layers", action="store_true", help="store layers unstacked (layers_0, ...)")
    parser.add_argument("--vocab_pad_multiple", type=int, default=1, help="pad the vocabulary rows to a multiple")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits with transformers before moving the checkpoint into place")
    parser.add_argument("--verify_rtol", type=float, default=verify.RELATIVE_TOLERANCE,
                        help="--verify's bound, relative to the largest logit (verify.LogitComparison)")
    args = parser.parse_args(argv)
    if args.verify:
        command.require("hf")
    verifier = verify.Verifier(rtol=args.verify_rtol) if args.verify else None
    try:
        config = convert_hf_to_orbax(args.hf_dir, args.output_dir, dtype=args.dtype, check=verifier,
                                     scan_layers=not args.no_scan_layers, vocab_pad_multiple=args.vocab_pad_multiple)
    except verify.VerificationFailed as e:
        print(e.result)
        print(f"{e}; nothing written at {args.output_dir}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}/0: {config.num_params() / 1e9:.3f}B params, {config.param_dtype}, "
          f"{'scanned' if config.scan_layers else 'unscanned'} layers")
    if verifier:
        print(verifier.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
