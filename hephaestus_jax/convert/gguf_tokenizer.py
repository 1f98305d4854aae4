"""Hugging Face tokenizer files rebuilt from a GGUF file's metadata (byte-level BPE, `tokenizer.ggml.model` gpt2).

transformers (5.3) loads a GGUF tokenizer correctly in memory, but the tokenizer.json its `save_pretrained`
writes reloads as a CodeLlamaTokenizer that encodes spaces as `<|endoftext|>`. So the files are written here from
the metadata with `tokenizers`: the vocabulary and merges, token type 3 (control) as special added tokens, the
pre-tokenizer named by `tokenizer.ggml.pre`, a ByteLevel decoder; plus tokenizer_config.json (BOS/EOS/pad,
chat template) and generation_config.json (bos/eos ids).
"""

from __future__ import annotations

import json
import os
from typing import Any

from hephaestus_jax.errors import InputError

class GGUFError(InputError, ValueError):
    """A GGUF file this converter cannot read; the message names the file and the field."""


_CONTROL_TOKEN_TYPE = 3
"""llama.cpp's token type of control (special) tokens."""

_PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    # SmolLM: single digits, then GPT-2's byte-level regex.
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
    "gpt2": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}],
}
"""`tokenizer.ggml.pre` -> the tokenizer.json pre-tokenizers that implement it."""


def _field(reader: Any, name: str, path: str, default: Any = ...) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is ...:
            raise GGUFError(f"{path}: GGUF metadata has no {name}")
        return default
    return field.contents()


def tokenizer_files(reader: Any, path: str) -> dict[str, dict]:
    """{file name: JSON content} of tokenizer.json, tokenizer_config.json and generation_config.json.

    `reader` is a `gguf.GGUFReader` of the file at `path` (named in errors).
    """
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = _field(reader, "tokenizer.ggml.pre", path, "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (known: {sorted(_PRE_TOKENIZERS)})")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    token_types = list(_field(reader, "tokenizer.ggml.token_type", path))
    merges = list(_field(reader, "tokenizer.ggml.merges", path))
    if len(token_types) != len(tokens):
        raise GGUFError(f"{path}: {len(tokens)} tokens but {len(token_types)} token types")
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (token, kind) in enumerate(zip(tokens, token_types)) if kind == _CONTROL_TOKEN_TYPE]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": _PRE_TOKENIZERS[pre]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)},
                  "merges": [merge.split(" ", 1) for merge in merges]},
    }
    if len(tokenizer_json["model"]["vocab"]) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate tokens")

    def token_at(name: str) -> str | None:
        token_id = _field(reader, name, path, None)
        return None if token_id is None else tokens[int(token_id)]

    bos_id, eos_id = _field(reader, "tokenizer.ggml.bos_token_id", path, None), _field(
        reader, "tokenizer.ggml.eos_token_id", path)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
        "chat_template": _field(reader, "tokenizer.chat_template", path, None),
    }
    generation_config = {"bos_token_id": None if bos_id is None else int(bos_id), "eos_token_id": int(eos_id)}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config}


def write_tokenizer_files(files: dict[str, dict], output_dir: str) -> None:
    """Write the `tokenizer_files` (tokenizer.json, tokenizer_config.json, generation_config.json) to output_dir."""
    os.makedirs(output_dir, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=1)
