"""Corpus hygiene for Hephaestus-Forge data, as streaming stages over JSONL corpora.

* :mod:`~hephaestus_jax.data.clean.jsonl` — streaming read (``file:line`` errors) and atomic write.
* :mod:`~hephaestus_jax.data.clean.quality` — fastText quality classifier: train, evaluate, filter.
* :mod:`~hephaestus_jax.data.clean.dedup` — exact and MinHash-LSH near-duplicate removal.
* :mod:`~hephaestus_jax.data.clean.decontaminate` — n-gram overlap removal against eval sets (BFCL).

Every stage maps an iterator of :class:`~hephaestus_jax.data.clean.jsonl.Document` to an iterator
of :class:`~hephaestus_jax.data.clean.jsonl.Decision`; ``tools/clean_corpus.py`` is the CLI.
The quality and dedup stages need the ``[data]`` extra (``fasttext-numpy2``, ``datasketch``).
"""
