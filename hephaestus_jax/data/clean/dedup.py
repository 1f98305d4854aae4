"""Exact and near-duplicate removal, streaming, first occurrence kept.

Normalisation (:func:`normalize_for_dedup`): Unicode NFKC, case folding, every run of whitespace
collapsed to one space, leading/trailing whitespace removed.  Punctuation and digits are kept, so
"exact" means "identical up to case, Unicode compatibility forms and whitespace".

* **Exact**: a 128-bit BLAKE2b digest of the normalised text; a document whose digest was seen
  before is an exact duplicate of the first document with that digest.
* **Near**: a MinHash signature (``datasketch``, seeded, so runs are reproducible) over shingles —
  word n-grams of ``\\w+`` tokens of the normalised text, or character n-grams of it — is looked up
  in a MinHash-LSH index of the *kept* documents.  LSH only proposes candidates; a candidate counts
  as a duplicate when the signatures' estimated Jaccard similarity is ``>= threshold``, and the
  most similar one (earliest on ties) is reported.  Documents with no shingle (no word token) are
  left to the exact stage.  A document shorter than ``ngram`` units is one shingle.

Memory is per kept document: a 16-byte digest, the id string, the MinHash signature
(``num_perm`` × 4 bytes) and its LSH buckets (one 8-byte key and one small set per band) — measured
at about 3.5 KiB per kept document with ``num_perm=128`` (9 bands × 13 rows at threshold 0.8), so
about 3.5 GB per million kept documents.  Nothing else grows with the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Literal

try:
    from datasketch import MinHash, MinHashLSH
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hephaestus_jax.data.clean.dedup needs datasketch: pip install 'hephaestus-jax[data]'"
    ) from error

import numpy as np

from hephaestus_jax.data.clean.jsonl import Decision, Document

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_MINHASH_SCHEME = "affine32"


def normalize_for_dedup(text: str) -> str:
    """NFKC, case-folded, whitespace-collapsed ``text`` (the text both dedup stages compare)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_digest(normalized_text: str) -> bytes:
    """128-bit BLAKE2b digest of an already normalised text."""
    return hashlib.blake2b(normalized_text.encode("utf-8"), digest_size=16).digest()


def shingles(normalized_text: str, *, unit: Literal["word", "char"], ngram: int) -> set[bytes]:
    """The set of word or character ``ngram``-shingles of a normalised text (UTF-8 encoded)."""
    if unit == "word":
        tokens = _WORD.findall(normalized_text)
        if not tokens:
            return set()
        return {" ".join(tokens[i:i + ngram]).encode("utf-8") for i in range(max(1, len(tokens) - ngram + 1))}
    if unit == "char":
        if not normalized_text:
            return set()
        n = len(normalized_text)
        return {normalized_text[i:i + ngram].encode("utf-8") for i in range(max(1, n - ngram + 1))}
    raise ValueError(f"shingle unit must be 'word' or 'char', got {unit!r}")


def _band_key(band: bytes) -> bytes:
    """Compact 8-byte LSH bucket key for one signature band (keeps the index small)."""
    return hashlib.blake2b(band, digest_size=8).digest()


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Which stages run and the MinHash-LSH settings."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle: Literal["word", "char"] = "word"
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Jaccard threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if not (self.exact or self.near):
            raise ValueError("nothing to do: both exact and near-duplicate removal are disabled")
        if self.shingle not in ("word", "char"):
            raise ValueError(f"shingle must be 'word' or 'char', got {self.shingle!r}")


class Deduplicator:
    """Stateful first-occurrence-wins deduplicator; feed documents in corpus order to :meth:`check`."""

    def __init__(self, config: DedupConfig = DedupConfig()) -> None:
        self.config = config
        self._kept_ids: list[str] = []
        self._digest_to_kept: dict[bytes, int] = {}
        self._signatures: dict[int, np.ndarray] = {}
        self._permutations = MinHash(num_perm=config.num_perm, seed=config.seed, scheme=_MINHASH_SCHEME).permutations
        self._lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm, hashfunc=_band_key)

    def _minhash(self, shingle_set: set[bytes]) -> MinHash:
        minhash = MinHash(num_perm=self.config.num_perm, seed=self.config.seed,
                          permutations=self._permutations, scheme=_MINHASH_SCHEME)
        minhash.update_batch(shingle_set)
        return minhash

    def _most_similar_kept(self, minhash: MinHash) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for candidate in sorted(self._lsh.query(minhash)):
            similarity = float(np.count_nonzero(self._signatures[candidate] == minhash.hashvalues)) / len(minhash)
            if similarity >= self.config.threshold and (best is None or similarity > best[1]):
                best = (candidate, similarity)
        return best

    def check(self, document: Document) -> Decision:
        """Keeps ``document`` (and remembers it) unless it duplicates an already kept one."""
        normalized = normalize_for_dedup(document.text)
        digest = exact_digest(normalized) if self.config.exact else b""
        if self.config.exact and digest in self._digest_to_kept:
            original = self._digest_to_kept[digest]
            return Decision(document, keep=False,
                            details={"reason": "exact", "duplicate_of": self._kept_ids[original]})
        minhash = None
        if self.config.near:
            shingle_set = shingles(normalized, unit=self.config.shingle, ngram=self.config.ngram)
            if shingle_set:
                minhash = self._minhash(shingle_set)
                match = self._most_similar_kept(minhash)
                if match is not None:
                    original, similarity = match
                    return Decision(document, keep=False, details={
                        "reason": "near", "duplicate_of": self._kept_ids[original],
                        "estimated_jaccard": similarity})
        index = len(self._kept_ids)
        self._kept_ids.append(document.id)
        if self.config.exact:
            self._digest_to_kept[digest] = index
        if minhash is not None:
            self._lsh.insert(index, minhash, check_duplication=False)
            self._signatures[index] = minhash.hashvalues
        return Decision(document, keep=True)


def deduplicate(documents: Iterable[Document], config: DedupConfig = DedupConfig()) -> Iterator[Decision]:
    """Streams one :class:`Decision` per document; removed ones carry ``reason`` and ``duplicate_of``."""
    deduplicator = Deduplicator(config)
    for document in documents:
        yield deduplicator.check(document)

