"""Exact and near-duplicate removal with an order-independent keep rule: the lowest document id wins.

Normalisation (:func:`normalize_for_dedup`): Unicode NFKC, case folding, every run of whitespace
collapsed to one space, leading/trailing whitespace removed.  Punctuation and digits are kept, so
"exact" means "identical up to case, Unicode compatibility forms and whitespace".

* **Exact**: a 128-bit BLAKE2b digest of the normalised text.  Documents with the same digest form
  an exact group; every member but the one with the lowest id is removed as an exact duplicate of it.
* **Near**: a MinHash signature (``datasketch``, seeded, so runs are reproducible) over shingles —
  word n-grams of ``\\w+`` tokens of the normalised text, or character n-grams of it — is cut into
  ``b`` bands of ``r`` rows (datasketch's optimal banding for the threshold) and each band hashed to
  a bucket key (:func:`band_keys`).  Documents sharing a bucket are candidates; a candidate pair is a
  *confirmed* duplicate when the signatures' estimated Jaccard similarity is ``>= threshold``.  A
  document is removed iff it has a confirmed duplicate with a lower id; it is reported as a
  duplicate of the most similar such document (lowest id on ties).  Only the lowest-id member of an
  exact group takes part (the others carry the same signature).  Documents with no shingle (no word
  token) are left to the exact stage.  A document shorter than ``ngram`` units is one shingle.

Ids are compared as strings.  The rule does not depend on the order in which documents arrive, so
the single-process path (:func:`deduplicate`) and the Beam path (:mod:`~hephaestus_jax.clean.beam`)
give the same decisions for any input order, sharding or parallelism — provided ids do not change
with the sharding (use an id field; the default ``file:line`` id changes when files are split).
The kept set never holds a confirmed pair (the later one of any such pair is removed); a removed
document's match may itself be removed (A~B, B~C: B and C go even when A and C differ).

Memory: the single-process path reads its input twice and holds every document's id, digest and
signature (``num_perm`` × 4 bytes) and its band-bucket entries in between, about 3.3 KiB per document
at ``num_perm=128`` (measured peak RSS: docs/performance.md): use it for small corpora.
The Beam path holds one exact group or one band bucket at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

try:
    from datasketch import MinHash, MinHashLSH
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hephaestus_jax.clean.dedup needs datasketch: pip install 'hephaestus-jax[data]'"
    ) from error

import numpy as np

from hephaestus_jax.clean.jsonl import Decision, Document

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


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What dedup needs of one document: its id, exact digest and MinHash signature (None: no shingle)."""

    id: str
    digest: bytes
    signature: np.ndarray | None


class Fingerprinter:
    """Computes :class:`Fingerprint` values and LSH band keys for one :class:`DedupConfig`."""

    def __init__(self, config: DedupConfig) -> None:
        self.config = config
        self._permutations = MinHash(num_perm=config.num_perm, seed=config.seed, scheme=_MINHASH_SCHEME).permutations
        lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
        self.bands, self.rows = lsh.b, lsh.r

    def __call__(self, doc_id: str, text: str) -> Fingerprint:
        normalized = normalize_for_dedup(text)
        digest = exact_digest(normalized) if self.config.exact else doc_id.encode("utf-8")
        signature = None
        if self.config.near:
            shingle_set = shingles(normalized, unit=self.config.shingle, ngram=self.config.ngram)
            if shingle_set:
                minhash = MinHash(num_perm=self.config.num_perm, seed=self.config.seed,
                                  permutations=self._permutations, scheme=_MINHASH_SCHEME)
                minhash.update_batch(shingle_set)
                signature = minhash.hashvalues.astype(np.uint32)
        return Fingerprint(doc_id, digest, signature)

    def band_keys(self, signature: np.ndarray) -> list[bytes]:
        """One bucket key per band: the band index and an 8-byte BLAKE2b of the band's values."""
        return [bytes([band]) + hashlib.blake2b(signature[band * self.rows:(band + 1) * self.rows].tobytes(),
                                                digest_size=8).digest()
                for band in range(self.bands)]


def exact_group_removals(fingerprints: Iterable[Fingerprint]) -> tuple[Fingerprint, list[tuple[str, dict[str, Any]]]]:
    """The lowest-id member of one exact group and ``(id, details)`` of every other member."""
    members = sorted(fingerprints, key=lambda f: f.id)
    keeper = members[0]
    return keeper, [(f.id, {"reason": "exact", "duplicate_of": keeper.id}) for f in members[1:]]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal MinHash values of two signatures."""
    return float(np.count_nonzero(a == b)) / len(a)


def confirmed_pairs(bucket: Iterable[Fingerprint], threshold: float) -> Iterator[tuple[str, tuple[float, str]]]:
    """``(higher id, (similarity, lower id))`` for every pair of one bucket at or above ``threshold``."""
    members = sorted(bucket, key=lambda f: f.id)
    for j, later in enumerate(members):
        for earlier in members[:j]:
            similarity = estimated_jaccard(earlier.signature, later.signature)
            if similarity >= threshold:
                yield later.id, (similarity, earlier.id)


def best_match(matches: Iterable[tuple[float, str]]) -> tuple[float, str]:
    """The most similar match, the lowest id on ties (a commutative, associative choice)."""
    return min(matches, key=lambda match: (-match[0], match[1]))


def near_details(match: tuple[float, str]) -> dict[str, Any]:
    """Removal details of a near duplicate of ``match``."""
    similarity, original = match
    return {"reason": "near", "duplicate_of": original, "estimated_jaccard": similarity}


def find_duplicates(documents: Iterable[Document], config: DedupConfig = DedupConfig()) -> dict[str, dict[str, Any]]:
    """``{id: removal details}`` of every duplicate in ``documents`` (see the module docstring).

    Raises ValueError when two documents share an id (the rule needs unique ids).
    """
    fingerprint = Fingerprinter(config)
    groups: dict[bytes, list[Fingerprint]] = collections.defaultdict(list)
    locations: dict[str, str] = {}
    for document in documents:
        if document.id in locations:
            raise ValueError(f"{document.location}: document id {document.id!r} also at {locations[document.id]}; "
                             "dedup needs unique ids (pass an id field with unique values)")
        locations[document.id] = document.location
        found = fingerprint(document.id, document.text)
        groups[found.digest].append(found)
    removals: dict[str, dict[str, Any]] = {}
    buckets: dict[bytes, list[Fingerprint]] = collections.defaultdict(list)
    for group in groups.values():
        keeper, exact = exact_group_removals(group)
        removals.update(exact)
        if keeper.signature is not None:
            for key in fingerprint.band_keys(keeper.signature):
                buckets[key].append(keeper)
    matches: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for bucket in buckets.values():
        for later, match in confirmed_pairs(bucket, config.threshold):
            matches[later].append(match)
    removals.update((doc_id, near_details(best_match(found))) for doc_id, found in matches.items())
    return removals


def deduplicate(documents: Sequence[Document] | Iterable[Document], config: DedupConfig = DedupConfig()
                ) -> Iterator[Decision]:
    """One :class:`Decision` per document, in input order; removed ones carry ``reason`` and ``duplicate_of``.

    ``documents`` is iterated twice (fingerprints first, decisions second), so it must be re-iterable
    (a list, or an object whose ``__iter__`` reads the input again), not a one-shot iterator.
    """
    if iter(documents) is documents:
        raise TypeError("deduplicate reads its documents twice: pass a re-iterable, not an iterator")
    return _decide(documents, config)


def _decide(documents: Iterable[Document], config: DedupConfig) -> Iterator[Decision]:
    removals = find_duplicates(documents, config)
    for document in documents:
        details = removals.get(document.id)
        yield Decision(document, keep=details is None, details=details or {})
