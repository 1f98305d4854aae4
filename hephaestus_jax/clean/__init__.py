"""Corpus hygiene for Hephaestus-Forge data, as stages over JSONL corpora, in one process or on Beam.

* :mod:`~hephaestus_jax.clean.jsonl` — streaming read (``file:line`` errors) and atomic write.
* :mod:`~hephaestus_jax.clean.quality` — fastText quality classifier: train, evaluate, filter.
* :mod:`~hephaestus_jax.clean.dedup` — exact and MinHash-LSH near-duplicate removal (lowest id kept).
* :mod:`~hephaestus_jax.clean.decontaminate` — n-gram overlap removal against eval sets (BFCL).
* :mod:`~hephaestus_jax.clean.beam` — the three as one Apache Beam job, with the same decisions.
* :mod:`~hephaestus_jax.clean.synthetic` — a generated corpus with planted duplicates and leaks.

Every single-process stage maps documents (:class:`~hephaestus_jax.clean.jsonl.Document`) to
:class:`~hephaestus_jax.clean.jsonl.Decision` values; quality and decontamination stream, dedup reads
its input twice.  ``tools/clean_corpus.py`` is the CLI; ``docs/corpus_hygiene.md`` the guide.
The quality and dedup stages need the ``[data]`` extra (``fasttext-wheel``, ``datasketch``).
"""
