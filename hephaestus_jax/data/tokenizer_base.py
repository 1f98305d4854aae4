"""What the Python-side seqio vocabularies share: the tf wrappers, pickling, decoding, byte-level BPE's alphabet."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf


class PythonTokenizerVocabulary(seqio.Vocabulary):
    """A seqio vocabulary whose `_encode`/`_decode` run in Python; the TensorFlow ops wrap them.

    Subclasses set `_path` and `_model` (None until loaded) and define `_loaded`, a loaded model whose
    `token_bytes[id]` are the bytes of each id; the model is not pickled (it is reloaded, cached per file).
    """

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def load_model(self) -> None:
        """Loads (and validates) the tokenizer now instead of at first use, like seqio's SentencePieceVocabulary."""
        _ = self._loaded

    @property
    def fingerprint(self) -> str:
        """`token_fingerprint` of this tokenizer: equal for tokenizers that map every id to the same bytes."""
        return self._loaded.fingerprint

    @property
    def path(self) -> str:
        """The tokenizer file this vocabulary was built from."""
        return self._path

    def encode_rendered(self, text: str) -> tuple[list[int], np.ndarray]:
        """Ids of a rendered chat template, as transformers tokenizes one (`add_special_tokens=False`): the
        special-token strings in `text` become their ids and the text between them is encoded as usual. Also
        returns each token's end as a byte offset into `text.encode()`, for mapping character spans to tokens."""
        special = self.special_tokens
        ids: list[int] = []
        pieces = _special_token_pattern(tuple(special)).split(text) if special else [text]
        for index, piece in enumerate(pieces):
            if index % 2:
                ids.append(special[piece])
            elif piece:
                ids.extend(self._encode(piece))
        token_bytes = self._loaded.token_bytes
        ends = np.cumsum([len(token_bytes[token_id]) for token_id in ids], dtype=np.int64)
        if (ends[-1] if ids else 0) != len(text.encode("utf-8")):
            raise ValueError(f"{self._path}: the tokens of a rendered chat do not spell its text (a tokenizer "
                             "with a normalizer?); chat templates need a byte-level BPE tokenizer")
        return ids, ends

    def _decode(self, ids: Iterable[int]) -> str:
        token_bytes = self._loaded.token_bytes
        pad_id = self.pad_id
        pieces = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == pad_id:
                continue
            if not 0 <= token_id < len(token_bytes):
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary [0, {len(token_bytes)}) of {self._path}"
                )
            pieces.append(token_bytes[token_id])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _encode_tf(self, s: tf.Tensor | str) -> tf.Tensor:
        """Scalar tf.string (or a Python str) -> 1-D tf.int32 ids (the Python tokenizer through tf.numpy_function)."""

        def encode_bytes(text: np.ndarray | bytes) -> np.ndarray:
            return np.asarray(self._encode(np.asarray(text).item().decode("utf-8")), dtype=np.int32)

        ids = tf.numpy_function(encode_bytes, [tf.convert_to_tensor(s, tf.string)], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """n-d tf.int32 ids -> (n-1)-d tf.string, decoding each row along the last axis."""

        def decode_rows(array: np.ndarray) -> np.ndarray:
            leading_shape = array.shape[:-1]
            rows = array.reshape((int(np.prod(leading_shape)), array.shape[-1]))
            texts = [self._decode(row).encode("utf-8") for row in rows]
            return np.array(texts, dtype=object).reshape(leading_shape)

        texts = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts


@functools.lru_cache(maxsize=8)
def _special_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Splits a text at the special tokens, keeping them (longest first, so no token is cut by a prefix)."""
    return re.compile("(" + "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)) + ")")


def token_fingerprint(token_bytes: Sequence[bytes]) -> str:
    """sha256 over every id's bytes: equal for two tokenizers that map every id to the same bytes."""
    digest = hashlib.sha256()
    for piece in token_bytes:
        digest.update(len(piece).to_bytes(4, "little"))
        digest.update(piece)
    return digest.hexdigest()


@functools.cache
def byte_level_alphabet() -> dict[int, str]:
    """The byte -> printable character map that byte-level BPE (GPT-2 style) uses to store tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in alphabet)
    for offset, byte in enumerate(shifted):
        alphabet[byte] = chr(256 + offset)
    return alphabet
