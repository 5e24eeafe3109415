"""The demo's default corpus, generated (nothing is downloaded).

A deterministic mixture a small model can learn in minutes: two-digit additions
(``37+48=85``), whose answers need the model to carry digits, and sentences of a
small agreement grammar (``the old cats chase a dog .``), where verbs agree with
their subjects. Validation text comes from a different seed.
"""

from __future__ import annotations

import random

SUBJECTS = ["cat", "dog", "bird", "child", "farmer", "robot", "teacher", "horse"]
OBJECTS = ["ball", "tree", "river", "book", "house", "apple", "road", "song"]
ADJECTIVES = ["old", "small", "green", "quiet", "happy", "tall"]
VERBS = ["see", "chase", "like", "find", "carry", "watch"]
ADVERBS = ["", "", "slowly", "often", "never"]


def _noun_phrase(rng: random.Random, nouns: list[str], plural: bool) -> str:
    words = [rng.choice(["the", "a"]) if not plural else rng.choice(["the", "some"])]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(rng.choice(nouns) + ("s" if plural else ""))
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    plural = rng.random() < 0.5
    verb = rng.choice(VERBS)
    verb = verb if plural else verb + ("es" if verb.endswith(("sh", "ch")) else "s")
    adverb = rng.choice(ADVERBS)
    parts = [_noun_phrase(rng, SUBJECTS, plural), adverb, verb]
    parts.append(_noun_phrase(rng, OBJECTS, rng.random() < 0.5))
    return " ".join(p for p in parts if p) + " ."


def addition(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}"


def generate(num_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < num_chars:
        line = addition(rng) if rng.random() < 0.4 else sentence(rng)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def load(path: str | None, train_chars: int = 300_000) -> tuple[str, str]:
    """(train, validation) text: the generated corpus, or a user's file split 90/10."""
    if path is None:
        return generate(train_chars, seed=0), generate(train_chars // 10, seed=1)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 2000:
        raise ValueError(
            f"Data file {path!r} has {len(text)} characters; need at least 2000"
        )
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]
