"""A procedurally generated translation task: the small-scale stand-in for IWSLT/XSum.

Each example is ``"<source words> > <target words>\\n"``: a sentence of 2-3 words of a
made-up source language and its translation into a made-up target language, word by
word through a fixed dictionary, with a word-order rule. A decoder-only model sees the
whole line (as GPT-2 sees "translate German to English: [source]. English: [target]"
in the paper) and is trained and scored on the target characters only (after ``>``,
through the end-of-line), like conditional language modelling.

Learning it needs attention (find the right source word, in the right order) and
memory (the dictionary, stored in the MLPs), so a low-rank update can fall short.

Two distributions:
  * ``"pretrain"``: the target words in reversed source order;
  * ``"shifted"`` (fine-tuning): the target in source order, and a quarter of the
    dictionary replaced by new target words.

Nothing is downloaded: everything comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SRC_CONSONANTS, TGT_CONSONANTS, VOWELS = "bdgklmnprst", "cfhjqvwxyz", "aeiou"
VOCAB = sorted(set(SRC_CONSONANTS + TGT_CONSONANTS + VOWELS + " >\n"))
PAD = len(VOCAB)  # padding id (input only; its targets are ignored)
VOCAB_SIZE = len(VOCAB) + 1
CHAR_ID = {c: i for i, c in enumerate(VOCAB)}
IGNORE = -100
CONTEXT = 32
LEXICON_SIZE = 32
LANGUAGE_SEED = 1234  # the languages; data seeds only choose sentences


def _words(rng: random.Random, consonants: str, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(consonants) + rng.choice(VOWELS) for _ in "ab"))
    return sorted(words)


@dataclass(frozen=True)
class Language:
    """Source lexicon and the dictionary of one distribution."""

    source: tuple[str, ...]
    dictionary: dict[str, str]
    reverse: bool


def language(distribution: str) -> Language:
    if distribution not in ("pretrain", "shifted"):
        raise ValueError(f"Unknown distribution {distribution!r}")
    rng = random.Random(LANGUAGE_SEED)
    source = _words(rng, SRC_CONSONANTS, LEXICON_SIZE)
    target = _words(rng, TGT_CONSONANTS, 2 * LEXICON_SIZE)
    rng.shuffle(target)
    dictionary = dict(zip(source, target[:LEXICON_SIZE], strict=True))
    if distribution == "pretrain":
        return Language(tuple(source), dictionary, reverse=True)
    changed = rng.sample(source, LEXICON_SIZE // 4)
    spare = iter(target[LEXICON_SIZE:])
    dictionary.update({w: next(spare) for w in changed})
    return Language(tuple(source), dictionary, reverse=False)


def sentence(lang: Language, rng: random.Random) -> str:
    words = [rng.choice(lang.source) for _ in range(rng.randint(2, 3))]
    translated = [lang.dictionary[w] for w in words]
    if lang.reverse:
        translated.reverse()
    return f"{' '.join(words)} > {' '.join(translated)}\n"


def encode(lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (n, CONTEXT); targets only on the translation."""
    inputs = torch.full((len(lines), CONTEXT), PAD, dtype=torch.long)
    targets = torch.full((len(lines), CONTEXT), IGNORE, dtype=torch.long)
    for row, line in enumerate(lines):
        ids = [CHAR_ID[c] for c in line]
        if len(ids) > CONTEXT + 1:
            raise ValueError(f"Line of {len(ids)} characters exceeds the context")
        start = line.index(">") + 1  # predict from the character after " >"
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, start : len(ids) - 1] = torch.tensor(ids[start + 1 :])
    return inputs, targets


def dataset(distribution: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` encoded examples of ``distribution``; disjoint seeds give disjoint draws."""
    lang, rng = language(distribution), random.Random(seed)
    return encode([sentence(lang, rng) for _ in range(n)])


# Data seeds: training streams and the two held-out sets never share a seed.
TRAIN_SEED, VALID_SEED, TEST_SEED, PRETRAIN_SEED = 0, 10_001, 20_002, 30_003
