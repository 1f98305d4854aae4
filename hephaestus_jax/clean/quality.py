"""fastText quality classifier: high-quality seed agent data (positives) vs general text (negatives).

Training streams the two corpora once into a labelled fastText training file (plus a held-out
file), shuffles it out of core in seeded buckets, trains a supervised fastText model and measures
precision / recall / F1 of the positive class on the held-out split at the chosen threshold.
Filtering scores one document at a time and keeps those with ``P(pos) >= threshold``.

Held-out split: a document goes to the held-out set when
``blake2b(f"{seed}:{one_line_text}")`` mapped to [0, 1) is below ``heldout_fraction``.  The split
is deterministic, needs no memory, and puts identical texts on the same side (no train/held-out
leakage through duplicates); the held-out size is ``heldout_fraction`` of the data in expectation.

Text is made one line for fastText by :func:`fasttext_line`: every run of whitespace (newlines,
tabs, Unicode separators) and NUL becomes one space, and the label prefix ``__label__`` inside the
text is rewritten to ``_label_`` so that a document can never inject a label.  Case is kept.

The model is saved in fastText's own binary format (``model.save_model``), never pickled.
Training is bit-reproducible for a given seed only with ``threads=1`` (fastText's Hogwild SGD
races otherwise).

fastText package: ``fasttext-wheel==0.9.2`` (prebuilt wheels of the fastText 0.9.2 release).
Builds of fastText's master since January 2024 — PyPI ``fasttext`` 0.9.3, ``fasttext-numpy2``,
``fasttext-numpy2-wheel``, ``fasttext-community`` — allocate the input matrix uninitialised and
randomly initialise only ``min(threads, 10)/10`` of it, so small models differ from run to run and training
sometimes fails with "Encountered NaN".  0.9.2's Python wrappers mishandle NumPy 2 arrays, so
scoring calls the binding's ``predict`` directly, which returns plain Python values.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

try:
    import fasttext
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hephaestus_jax.clean.quality needs fastText: pip install 'hephaestus-jax[data]' "
        "(package fasttext-wheel)"
    ) from error

from hephaestus_jax.clean.jsonl import Decision, Document

LABEL_PREFIX = "__label__"
POSITIVE_LABEL = f"{LABEL_PREFIX}pos"
NEGATIVE_LABEL = f"{LABEL_PREFIX}neg"

_WHITESPACE_OR_NUL = re.compile(r"[\s\x00]+")


def fasttext_line(text: str) -> str:
    """``text`` as one fastText input line: whitespace collapsed, label prefix neutralised."""
    return _WHITESPACE_OR_NUL.sub(" ", text).strip().replace(LABEL_PREFIX, "_label_")


def is_heldout(line: str, *, seed: int, heldout_fraction: float) -> bool:
    """Deterministic held-out assignment of one (already one-line) text; see the module docstring."""
    digest = hashlib.blake2b(f"{seed}:{line}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < heldout_fraction


@dataclasses.dataclass(frozen=True)
class FastTextParams:
    """fastText supervised-training hyper-parameters (fastText's names in brackets)."""

    epoch: int = 5
    lr: float = 0.1
    dim: int = 100
    word_ngrams: int = 2  # [wordNgrams]
    min_count: int = 1  # [minCount]
    bucket: int = 2_000_000
    threads: int = 1  # [thread]; > 1 is faster but not bit-reproducible


@dataclasses.dataclass
class BinaryMetrics:
    """Confusion counts of the positive class at one threshold, with derived metrics."""

    threshold: float
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    true_negatives: int = 0

    def add(self, probability_positive: float, is_positive: bool) -> None:
        predicted = probability_positive >= self.threshold
        if predicted and is_positive:
            self.true_positives += 1
        elif predicted:
            self.false_positives += 1
        elif is_positive:
            self.false_negatives += 1
        else:
            self.true_negatives += 1

    @property
    def precision(self) -> float | None:
        predicted = self.true_positives + self.false_positives
        return self.true_positives / predicted if predicted else None

    @property
    def recall(self) -> float | None:
        actual = self.true_positives + self.false_negatives
        return self.true_positives / actual if actual else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None or p + r == 0:
            return None
        return 2 * p * r / (p + r)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


class QualityClassifier:
    """A trained fastText model with ``__label__pos`` / ``__label__neg``; scores P(pos)."""

    def __init__(self, model: Any, source: str = "<memory>") -> None:
        labels = set(model.get_labels())
        if labels != {POSITIVE_LABEL, NEGATIVE_LABEL}:
            raise ValueError(
                f"{source}: expected a fastText model with labels {POSITIVE_LABEL} and {NEGATIVE_LABEL}, "
                f"got {sorted(labels)}"
            )
        self._model = model

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QualityClassifier:
        """Loads a model saved by :meth:`save` (fastText binary format)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such fastText model file")
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # fastText 0.9.2 prints an obsolete API warning
                model = fasttext.load_model(path)
        except ValueError as error:
            raise ValueError(f"{path}: not a fastText model file ({error})") from error
        return cls(model, source=path)

    def save(self, path: str | os.PathLike[str]) -> None:
        self._model.save_model(os.fspath(path))

    def positive_probability(self, text: str) -> float:
        """P(pos) of one text (made one-line with :func:`fasttext_line`); 0.0 for a blank text.

        A blank text is scored 0.0 explicitly: fastText would score its end-of-line token alone.
        """
        line = fasttext_line(text)
        if not line:
            return 0.0
        # The binding's own predict returns (probability, label) pairs as Python floats; fastText 0.9.2's
        # Python wrappers around it build NumPy arrays in ways NumPy 2 rejects or corrupts.
        by_label = {label: p for p, label in self._model.f.predict(line + "\n", 2, 0.0, "replace")}
        # fastText adds 1e-5 to every probability; renormalising keeps P(pos) within [0, 1].
        return by_label[POSITIVE_LABEL] / (by_label[POSITIVE_LABEL] + by_label[NEGATIVE_LABEL])


def filter_by_quality(
    documents: Iterable[Document], classifier: QualityClassifier, *, threshold: float
) -> Iterator[Decision]:
    """Keeps documents with ``P(pos) >= threshold``; details carry ``quality_score``."""
    for document in documents:
        keep, details = quality_verdict(classifier, document.text, threshold)
        yield Decision(document, keep=keep, details=details)


def quality_verdict(classifier: QualityClassifier, text: str, threshold: float) -> tuple[bool, dict[str, Any]]:
    """``(keep, details)`` of one text: kept when ``P(pos) >= threshold``; details carry the score."""
    score = classifier.positive_probability(text)
    return score >= threshold, {"quality_score": score}


@dataclasses.dataclass
class QualityTrainingReport:
    """What training saw and how the model does on the held-out split."""

    model_path: str
    train_positive: int
    train_negative: int
    heldout_positive: int
    heldout_negative: int
    empty_documents: int
    heldout_metrics: BinaryMetrics
    params: FastTextParams
    seed: int
    heldout_fraction: float

    def to_dict(self) -> dict[str, Any]:
        report = dataclasses.asdict(self)
        report["heldout_metrics"] = self.heldout_metrics.to_dict()
        return report


def _shuffle_to_file(lines: Iterable[str], output_path: str, *, seed: int, num_buckets: int, work_dir: str) -> None:
    """Out-of-core shuffle: scatter lines into seeded random buckets, then shuffle each in memory.

    Memory is bounded by the largest bucket (about total size / ``num_buckets``).
    """
    rng = random.Random(seed)
    bucket_paths = [os.path.join(work_dir, f"bucket-{i:05d}.txt") for i in range(num_buckets)]
    bucket_files = [open(p, "w", encoding="utf-8") for p in bucket_paths]
    try:
        for line in lines:
            bucket_files[rng.randrange(num_buckets)].write(line + "\n")
    finally:
        for handle in bucket_files:
            handle.close()
    with open(output_path, "w", encoding="utf-8") as output:
        for bucket_path in bucket_paths:
            with open(bucket_path, encoding="utf-8") as bucket:
                bucket_lines = bucket.readlines()
            rng.shuffle(bucket_lines)
            output.writelines(bucket_lines)
            os.remove(bucket_path)


_SPLIT_COUNTS = ("train_positive", "train_negative", "heldout_positive", "heldout_negative", "empty_documents")


def _split_labelled_lines(
    positive_texts: Iterable[str],
    negative_texts: Iterable[str],
    heldout_file: IO[str],
    counts: collections.Counter[str],
    *,
    seed: int,
    heldout_fraction: float,
) -> Iterator[str]:
    """Yields the labelled training lines; writes held-out lines to ``heldout_file``; counts both."""
    for label, kind, texts in ((POSITIVE_LABEL, "positive", positive_texts),
                               (NEGATIVE_LABEL, "negative", negative_texts)):
        for text in texts:
            line = fasttext_line(text)
            if not line:
                counts["empty_documents"] += 1
            elif is_heldout(line, seed=seed, heldout_fraction=heldout_fraction):
                heldout_file.write(f"{label} {line}\n")
                counts[f"heldout_{kind}"] += 1
            else:
                counts[f"train_{kind}"] += 1
                yield f"{label} {line}"


def _evaluate_heldout(classifier: QualityClassifier, heldout_path: str, threshold: float) -> BinaryMetrics:
    metrics = BinaryMetrics(threshold)
    with open(heldout_path, encoding="utf-8") as heldout_file:
        for line in heldout_file:
            label, text = line.rstrip("\n").split(" ", 1)
            metrics.add(classifier.positive_probability(text), label == POSITIVE_LABEL)
    return metrics


def train_quality_classifier(
    positive_texts: Iterable[str],
    negative_texts: Iterable[str],
    model_path: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    params: FastTextParams = FastTextParams(),
    shuffle_buckets: int = 16,
    work_dir: str | None = None,
) -> QualityTrainingReport:
    """Trains and saves the classifier; returns counts and held-out metrics at ``threshold``.

    Both text streams are read once.  Empty texts (nothing left after :func:`fasttext_line`) carry
    no signal and are counted in ``empty_documents`` instead of being trained on.  Raises
    ValueError when either class has no training documents.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    model_path = os.fspath(model_path)
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="quality-") as tmp:
        heldout_path, train_path = os.path.join(tmp, "heldout.txt"), os.path.join(tmp, "train.txt")
        with open(heldout_path, "w", encoding="utf-8") as heldout_file:
            lines = _split_labelled_lines(positive_texts, negative_texts, heldout_file, counts, seed=seed,
                                          heldout_fraction=heldout_fraction)
            _shuffle_to_file(lines, train_path, seed=seed, num_buckets=shuffle_buckets, work_dir=tmp)
        if not counts["train_positive"] or not counts["train_negative"]:
            raise ValueError(
                f"need training documents of both classes, got {counts['train_positive']} positive and "
                f"{counts['train_negative']} negative (after the held-out split)"
            )
        model = fasttext.train_supervised(
            input=train_path, epoch=params.epoch, lr=params.lr, dim=params.dim, wordNgrams=params.word_ngrams,
            minCount=params.min_count, bucket=params.bucket, thread=params.threads, seed=seed, loss="softmax",
            verbose=0,
        )
        classifier = QualityClassifier(model)
        metrics = _evaluate_heldout(classifier, heldout_path, threshold)
    directory = os.path.dirname(model_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    classifier.save(f"{model_path}.tmp")
    os.replace(f"{model_path}.tmp", model_path)
    return QualityTrainingReport(model_path=model_path, heldout_metrics=metrics, params=params, seed=seed,
                                 heldout_fraction=heldout_fraction, **{name: counts[name] for name in _SPLIT_COUNTS})
