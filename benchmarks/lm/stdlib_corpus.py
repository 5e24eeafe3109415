"""Real text on any machine, offline: the Python standard library's own source files.

The corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``
(``site-packages`` excluded: it differs between machines), read as UTF-8 (files that
are not valid UTF-8, a few deliberately broken test inputs, are skipped and counted).
It is split **by file** into train and validation: a file is in validation when the
first 8 bytes of the SHA-256 of its relative path (with ``/``), modulo 100, are below
``VALID_PERCENT`` (5 %), so the split does not depend on the file system's listing order and a
file never contributes to both sides.

A byte-level BPE (``tokenizers``) is trained here on the training files only, then
both splits are encoded, each file followed by ``<|endoftext|>``, and cached as
``uint16`` arrays. The cache key is the Python version, the vocabulary size, the
corpus hash (relative paths and contents of the files used) and ``FORMAT``; nothing
is downloaded. The stdlib, and so the corpus, depends on the Python version, which
every result records.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the split, the tokenizer recipe or the file layout changes
VALID_PERCENT = 5
EOS = "<|endoftext|>"
EXCLUDED_DIRS = ("site-packages", "__pycache__")


def default_cache() -> Path:
    """``$FLORA_LM_CACHE``, else ``$XDG_CACHE_HOME/flora/lm`` (``~/.cache/flora/lm``)."""
    if os.environ.get("FLORA_LM_CACHE"):
        return Path(os.environ["FLORA_LM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flora" / "lm"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative: str) -> bool:
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALID_PERCENT


@dataclass
class Files:
    """The corpus files of one root: relative path -> text, and what was skipped."""

    root: str
    texts: dict[str, str]
    skipped: list[str]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for rel in sorted(self.texts):
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256(self.texts[rel].encode()).digest())
        return h.hexdigest()

    def split(self) -> tuple[list[str], list[str]]:
        """(train, validation) relative paths, each sorted."""
        rels = sorted(self.texts)
        valid = [r for r in rels if is_validation(r)]
        return [r for r in rels if not is_validation(r)], valid


def read_files(root: Path | None = None) -> Files:
    root = stdlib_root() if root is None else Path(root)
    texts, skipped = {}, []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in EXCLUDED_DIRS for part in path.relative_to(root).parts):
            continue
        if not path.is_file():
            continue
        try:
            texts[rel] = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
    if not texts:
        raise FileNotFoundError(f"No *.py files under {root}")
    return Files(str(root), texts, skipped)


@dataclass
class Corpus:
    """Token ids of both splits, the tokenizer, and what identifies them."""

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    eos: int
    tokenizer_path: Path
    meta: dict

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _encode(tokenizer, texts: list[str], eos: int) -> np.ndarray:
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += encoding.ids
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def load(
    vocab_size: int = 4096, cache: Path | None = None, root: Path | None = None,
    verbose: bool = True,
) -> Corpus:  # fmt: skip
    """The tokenized corpus, built once per key and then read from ``cache``."""
    if not 256 < vocab_size <= 2**16:
        raise ValueError(f"vocab_size must be in 257..65536, got {vocab_size}")
    files = read_files(root)
    python = platform.python_version()
    key_fields = {"format": FORMAT, "python": python, "vocab_size": vocab_size,
                  "corpus_sha256": files.digest}  # fmt: skip
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    folder = (default_cache() if cache is None else Path(cache)) / f"data-{key[:16]}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        started = time.perf_counter()
        train_rels, valid_rels = files.split()
        if not train_rels or not valid_rels:
            raise ValueError(
                f"{files.root}: {len(train_rels)} training and {len(valid_rels)} "
                "validation files; both splits need at least one"
            )
        if verbose:
            print(f"corpus: training a {vocab_size}-token BPE on {len(train_rels)} "
                  f"files of {files.root} (once; cached in {folder})", flush=True)  # fmt: skip
        train_texts = [files.texts[r] for r in train_rels]
        tokenizer = _train_tokenizer(train_texts, vocab_size)
        eos = tokenizer.token_to_id(EOS)
        train = _encode(tokenizer, train_texts, eos)
        valid = _encode(tokenizer, [files.texts[r] for r in valid_rels], eos)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tmp / "tokenizer.json"))
        np.save(tmp / "train.npy", train)
        np.save(tmp / "valid.npy", valid)
        tok_sha = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
        meta = dict(
            key_fields, key=key, root=files.root, eos=eos,
            vocab_size=tokenizer.get_vocab_size(), tokenizer_sha256=tok_sha,
            files={"train": len(train_rels), "valid": len(valid_rels),
                   "skipped_not_utf8": len(files.skipped)},
            bytes={"train": sum(len(t.encode()) for t in train_texts),
                   "valid": sum(len(files.texts[r].encode()) for r in valid_rels)},
            tokens={"train": int(train.size), "valid": int(valid.size)},
            build_seconds=round(time.perf_counter() - started, 1),
        )  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(folder)  # atomic: a concurrent builder's copy wins
        except OSError:
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()
    meta = json.loads(meta_path.read_text())
    return Corpus(
        train=np.load(folder / "train.npy"),
        valid=np.load(folder / "valid.npy"),
        vocab_size=meta["vocab_size"],
        eos=meta["eos"],
        tokenizer_path=folder / "tokenizer.json",
        meta=meta,
    )


def train_batch(
    tokens: np.ndarray, step: int, seed: int, batch: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random windows of ``context + 1`` tokens: (inputs, targets).

    The windows depend only on (seed, step), so every optimizer of one seed sees the
    same batches, and a run can be resumed or repeated exactly.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context - 1, size=batch)
    rows = np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64)
    return rows[:, :-1], rows[:, 1:]


def valid_windows(tokens: np.ndarray, n: int, context: int) -> np.ndarray:
    """``n`` fixed windows of ``context + 1`` tokens spread evenly over validation."""
    last = len(tokens) - context - 1
    if last < 0:
        raise ValueError(f"validation has {len(tokens)} tokens, fewer than a window")
    starts = np.linspace(0, last, num=n).astype(np.int64)
    return np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64)
