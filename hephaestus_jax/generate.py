"""Try a checkpoint: decode a batch of prompts (plain text, or chat turns with tools in the checkpoint's own template).

    python -m hephaestus_jax.generate --checkpoint_dir runs/x/checkpoints --prompt "def fib(n):" [--prompt ...]
    python -m hephaestus_jax.generate --checkpoint_dir DIR --chat --tools tools.json --prompt "Weather in Oslo?"

Decoding itself is `inference.generate`; tool documents are read by `eval.tool_docs`.
"""

from __future__ import annotations

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from hephaestus_jax import distributed, gin_configs, inference
from hephaestus_jax.config import CHAT_FORMAT_NAMES, ConfigError
from hephaestus_jax.data import forge
from hephaestus_jax.eval import tool_docs

if TYPE_CHECKING:
    import seqio  # Imports TensorFlow; only chat rendering needs it at run time.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hephaestus_jax.generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="Orbax checkpoint directory (a converted or "
                        "training checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the shipped "
                        "Llama-3 tokenizer)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    parser.add_argument("--tokenizer_dir", dest="tokenizer", help="alias of --tokenizer (an HF checkpoint directory)")
    parser.add_argument("--chat", action="store_true", help="render each prompt as a user turn of a chat")
    parser.add_argument("--chat_format", choices=CHAT_FORMAT_NAMES, default=None,
                        help="chat format with --chat (default: the tokenizer's own chat template, else the "
                        "fallback its special tokens match)")
    parser.add_argument("--system", default="", help="system message (with --chat)")
    parser.add_argument("--tools", default=None, help="JSON file with a list of function documents (with --chat)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor_parallel", type=int, default=1, help="devices each model copy is split over")
    return parser


def encode_prompts(vocab: seqio.Vocabulary, texts: Sequence[str], *, chat: bool, system: str = "",
                   tools: Sequence[forge.ToolDoc] = (), chat_format: str | None = None) -> list[np.ndarray]:
    """Token prompts: chat turns ending in an open assistant header, or the tokenizer's prefix (BOS) + text."""
    if not chat:
        from hephaestus_jax.data.vocab import text_prefix_ids  # lazy: imports seqio (TensorFlow).

        return [np.asarray([*text_prefix_ids(vocab), *vocab.encode(text)], np.int32) for text in texts]
    from hephaestus_jax.data.chat_format import render_chat_prompt, resolve_chat_format  # lazy: TensorFlow.

    renderer = resolve_chat_format(vocab, chat_format)
    head = (forge.Message("system", system),) if system else ()
    return [render_chat_prompt((*head, forge.Message("user", text)), tools, renderer) for text in texts]


@command.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary  # lazy: TensorFlow after parsing.

    gin_configs.log_to_stderr()
    distributed.initialize()

    with command.input_errors(ValueError, TypeError):  # TypeError: --chat with a tokenizer not Llama-3's.
        if (args.system or args.tools or args.chat_format) and not args.chat:
            raise ConfigError("--system, --chat_format and --tools need --chat")
        sampling = inference.SamplingConfig(args.temperature, args.top_k, args.top_p)
        vocab = load_vocabulary(args.tokenizer or default_tokenizer_path())
        tools = tool_docs.read_tools(args.tools) if args.tools else ()
        prompts = encode_prompts(vocab, args.prompt, chat=args.chat, system=args.system, tools=tools,
                                 chat_format=args.chat_format)
        model = inference.load_model(args.checkpoint_dir, args.step,
                                     inference.inference_mesh_config(args.tensor_parallel))
        inference.check_vocabulary(vocab, model.config)
    result = inference.generate(model.config, model.params, prompts, max_new_tokens=args.max_new_tokens,
                                stop_ids=inference.stop_ids_of(vocab), sampling=sampling, seed=args.seed,
                                mesh=model.mesh)
    if jax.process_index() != 0:
        return 0
    for index, reason in enumerate(result.finish_reasons):
        print(f"--- completion {index} ({int(result.lengths[index])} tokens, finish: {reason}) ---")
        print(vocab.decode(result.completion(index).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
