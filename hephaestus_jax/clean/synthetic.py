"""A generated corpus with planted duplicates and benchmark leaks, for the cleaning tests and benchmark.

Documents are random word sequences over a pseudo-word vocabulary (so unrelated documents share
almost no 5-gram), half of them agent-style (a user request and a JSON tool call), half prose.
Planted, every so many documents: an exact duplicate of an earlier document (case and whitespace
changed), a near duplicate of one (its second word replaced: word 5-gram Jaccard 0.93 to 0.98), and a leak
(a document that quotes a 20-token span of one of ``eval_texts``).  Every record says what was
planted in ``planted``: ``exact:<id>``, ``near:<id>``, ``leak:<eval text index>`` or ``null``.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator, Sequence
from typing import Any

from hephaestus_jax.clean.decontaminate import word_tokens

_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "gu", "va", "zo", "be", "shi", "tru", "fen")
LEAK_TOKENS = 20


def _vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    words = {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(size * 2)}
    return sorted(words)[:size]


def _text(rng: random.Random, vocabulary: list[str], agent: bool) -> str:
    words = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(60, 160)))
    if not agent:
        return words.capitalize() + "."
    call = {"name": f"{rng.choice(vocabulary)}.{rng.choice(vocabulary)}", "arguments": {"query": rng.choice(vocabulary)}}
    return f"User: {words}\nAssistant: <tool_call>{json.dumps(call)}</tool_call>"


def synthetic_corpus(
    num_docs: int,
    *,
    seed: int = 0,
    eval_texts: Sequence[str] = (),
    exact_every: int = 25,
    near_every: int = 20,
    leak_every: int = 50,
) -> Iterator[dict[str, Any]]:
    """``num_docs`` records ``{"id", "text", "kind", "planted"}``, ids ``doc-0000000`` upwards."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    leak_sources = [tokens for tokens in map(word_tokens, eval_texts) if len(tokens) >= LEAK_TOKENS]
    originals: list[tuple[str, str, bool]] = []
    for i in itertools.islice(itertools.count(), num_docs):
        doc_id, planted = f"doc-{i:07d}", None
        agent = rng.random() < 0.5
        text = _text(rng, vocabulary, agent)
        if originals and i % exact_every == exact_every - 1:
            original_id, original, agent = rng.choice(originals)
            text, planted = "  " + original.upper().replace(" ", "\n "), f"exact:{original_id}"
        elif originals and i % near_every == near_every - 1:
            original_id, original, agent = rng.choice(originals)
            words = original.split(" ")
            words[1] = rng.choice(vocabulary) + "x"
            text, planted = " ".join(words), f"near:{original_id}"
        elif leak_sources and i % leak_every == leak_every // 2:
            source = rng.randrange(len(leak_sources))
            tokens = leak_sources[source]
            start = rng.randrange(len(tokens) - LEAK_TOKENS + 1)
            text, planted = f"{text} {' '.join(tokens[start:start + LEAK_TOKENS])}", f"leak:{source}"
        else:
            originals.append((doc_id, text, agent))
        yield {"id": doc_id, "text": text, "kind": "agent" if agent else "prose", "planted": planted}
