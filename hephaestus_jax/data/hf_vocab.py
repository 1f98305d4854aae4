"""A seqio vocabulary for any Hugging Face byte-level BPE tokenizer.json (SmolLM2, Qwen2.5, Hermes, ...).

Ids come from the `tokenizers` library with the file's own pre-tokenizer and merges. As in `Llama3Vocabulary`,
special-token *strings* inside text stay ordinary text (`encode_special_tokens`); control tokens are inserted by
id. BOS, EOS and padding come from the checkpoint's own files next to tokenizer.json: `generation_config.json`
(bos_token_id, eos_token_id) first, then `tokenizer_config.json` (bos_token, eos_token, pad_token). Whether a
sequence starts with BOS is the tokenizer's own choice (its post-processor, or `add_bos_token`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hephaestus_jax.data.tokenizer_base import PythonTokenizerVocabulary, byte_level_alphabet, token_fingerprint
from hephaestus_jax.json_lines import read_json

_load_lock = threading.Lock()


class HFTokenizerVocabulary(PythonTokenizerVocabulary):
    """Any byte-level BPE tokenizer.json as a seqio vocabulary; loaded lazily and cached per file."""

    def __init__(self, path: str | os.PathLike):
        self._path = os.fspath(path)
        self._model: _HFModel | None = None
        super().__init__(extra_ids=0)

    @property
    def _loaded(self) -> _HFModel:
        if self._model is None:
            with _load_lock:
                self._model = _load(os.path.realpath(self._path))
        return self._model

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Special-token string -> id (the tokenizer's added tokens marked special)."""
        return self._loaded.special_tokens

    def special_id(self, name: str) -> int:
        """Id of a special token given as its full string, e.g. special_id("<|im_end|>")."""
        try:
            return self._loaded.special_tokens[name]
        except KeyError:
            raise KeyError(f"{self._path} has no special token {name!r}") from None

    @property
    def bos_id(self) -> int:
        bos = self._loaded.bos_id
        if bos is None:
            raise ValueError(f"{self._path}: the tokenizer defines no BOS token (bos_token / bos_token_id)")
        return bos

    @property
    def eos_id(self) -> int:
        return self._loaded.eos_ids[0]

    @property
    def pad_id(self) -> int:
        """The pad token of tokenizer_config.json, else EOS. Padded positions are masked; decode drops them."""
        return self._loaded.pad_id

    @property
    def unk_id(self) -> None:
        return None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: every EOS id of generation_config.json (or tokenizer_config.json's eos)."""
        return self._loaded.eos_ids

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """What the tokenizer puts before a text: (bos_id,) when it adds BOS, else ()."""
        return self._loaded.prefix_ids

    @property
    def _base_vocab_size(self) -> int:
        return len(self._loaded.token_bytes)

    def _encode(self, s: str) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"HFTokenizerVocabulary.encode takes a str, got {type(s).__name__}")
        return self._loaded.encode(s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizerVocabulary) and self._loaded.fingerprint == other._loaded.fingerprint

    def __hash__(self) -> int:
        return hash(self._loaded.fingerprint)

    def __str__(self) -> str:
        return f"HFTokenizerVocabulary(path={self._path!r})"

    __repr__ = __str__


@dataclass(frozen=True)
class _HFModel:
    encode: Any
    token_bytes: tuple[bytes, ...]
    special_tokens: Mapping[str, int]
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    prefix_ids: tuple[int, ...]
    fingerprint: str


def read_json_object(path: str) -> dict:
    """A tokenizer file's JSON object ({} when the file is absent); ValueError naming the file when it is not one."""
    if not os.path.isfile(path):
        return {}
    return read_json(path, dict, "a JSON object")


def token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@functools.cache
def _load(path: str) -> _HFModel:
    import tokenizers

    spec = read_json_object(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path} is not a byte-level BPE tokenizer.json (model.type must be 'BPE')")
    byte_of_char = {char: byte for byte, char in byte_level_alphabet().items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    token_bytes: list[bytes | None] = [None] * size
    for token_id, entry in added.items():
        token_bytes[token_id] = entry["content"].encode("utf-8")
    for token, token_id in model["vocab"].items():
        if token_id in added:
            continue
        try:
            token_bytes[token_id] = bytes(byte_of_char[char] for char in token)
        except KeyError:
            raise ValueError(f"{path}: token {token!r} (id {token_id}) is not byte-level encoded") from None
    missing = [i for i, piece in enumerate(token_bytes) if piece is None]
    if missing:
        raise ValueError(f"{path}: ids {missing[:5]} have no token; ids must be 0..{size - 1} without gaps")
    special_tokens = {entry["content"]: token_id for token_id, entry in added.items() if entry.get("special")}

    directory = os.path.dirname(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    generation_path = os.path.join(directory, "generation_config.json")
    config, generation = read_json_object(config_path), read_json_object(generation_path)

    def config_id(field: str) -> int | None:
        text = token_text(config.get(field))
        if text is None:
            return None
        if text not in special_tokens and text not in model["vocab"]:
            raise ValueError(f"{config_path}: {field} {text!r} is not a token of {path}")
        return special_tokens.get(text, model["vocab"].get(text))

    bos_id = generation.get("bos_token_id", config_id("bos_token"))
    eos = generation.get("eos_token_id", config_id("eos_token"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    if not eos_ids:
        raise ValueError(f"{path}: no EOS token: neither {generation_path} (eos_token_id) nor {config_path} "
                         "(eos_token) names one")
    for field, token_id in (("bos_token_id", bos_id), *(("eos_token_id", i) for i in eos_ids)):
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < size):
            raise ValueError(f"{path}: {field} {token_id!r} is not an id of this tokenizer [0, {size})")
    pad_id = config_id("pad_token")
    pad_id = eos_ids[0] if pad_id is None else pad_id

    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.encode_special_tokens = True
    added_by_tokenizer = tokenizer.encode("", add_special_tokens=True).ids
    if config.get("add_bos_token") and bos_id is not None and bos_id not in added_by_tokenizer:
        added_by_tokenizer = [bos_id, *added_by_tokenizer]
    prefix_ids = tuple(added_by_tokenizer[:1]) if added_by_tokenizer[:1] == [bos_id] else ()

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return _HFModel(encode=encode, token_bytes=tuple(token_bytes), special_tokens=special_tokens, bos_id=bos_id,
                    eos_ids=eos_ids, pad_id=pad_id, prefix_ids=prefix_ids, fingerprint=token_fingerprint(token_bytes))
