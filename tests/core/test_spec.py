"""docs/spec.md cannot drift from the code: its known-answer blocks, checked here.

Each block of the spec follows a marker ``<!-- spec:NAME -->`` and is the next fenced
code block. The Random123 known answers, the golden rows, the extra block, the
gaussian table values and hash, the float words, the Philox constants, the codes and
the Python reference are parsed from the page and compared with ``flora_core``, so
changing a number in the page (or in the code) fails a test.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from flora_core import policy, rng, state

SPEC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
HEX_WORD = re.compile(r"^[0-9a-f]{8}$")


def block(name: str) -> list[str]:
    """The non-empty lines of the fenced block after ``<!-- spec:name -->``."""
    text = SPEC.read_text(encoding="utf-8")
    marker = f"<!-- spec:{name} -->"
    assert text.count(marker) == 1, f"{SPEC} must hold exactly one {marker}"
    after = text.split(marker, 1)[1].lstrip("\n")
    assert after.startswith("```"), f"{marker} must be followed by a fenced block"
    body = after.split("\n", 1)[1].split("\n```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def hex_words(fields: list[str]) -> list[int]:
    assert all(HEX_WORD.match(f) for f in fields), fields
    return [int(f, 16) for f in fields]


def parse_kat(line: str) -> tuple[list[int], list[int], list[int]]:
    counter, rest = line.split("|")
    key, out = rest.split("->")
    return hex_words(counter.split()), hex_words(key.split()), hex_words(out.split())


def reference() -> dict:
    """The spec's plain-Python Philox and layout, executed from the page."""
    namespace: dict = {}
    exec(compile("\n".join(block("reference")), f"{SPEC}:reference", "exec"), namespace)
    return namespace


KAT_LINES = block("kat")


def test_known_answer_block_is_complete():
    assert len(KAT_LINES) == 3


@pytest.mark.parametrize("line", KAT_LINES, ids=range(len(KAT_LINES)))
def test_random123_known_answers(line):
    counter, key, expected = parse_kat(line)
    assert len(counter) == 4 and len(key) == 2 and len(expected) == 4
    got = rng.philox4x32(counter, key, xp=np)
    assert [int(w) for w in got] == expected
    assert list(reference()["philox4x32_10"](counter, key)) == expected


def test_golden_rows():
    rows = [hex_words(line.split()) for line in block("golden-rows")]
    assert len(rows) == 2 and all(len(row) == 8 for row in rows)
    got = rng.random_bits(0, 0, 0, (2, 8), xp=np)
    np.testing.assert_array_equal(got, np.array(rows, dtype=np.uint32))
    word = reference()["word"]
    assert [[word(0, 0, 0, r, c) for c in range(8)] for r in range(2)] == rows


def test_unaligned_block():
    header, *lines = block("block")
    fields = dict(item.split("=") for item in header.split())
    seed, step, stream = (int(fields[k], 0) for k in ("seed", "step", "stream"))
    row0, col0 = int(fields["row0"]), int(fields["col0"])
    rows = np.array([hex_words(line.split()) for line in lines], dtype=np.uint32)
    assert rows.shape == (2, 6) and seed >> 32 and col0 & 3
    got = rng.random_bits(seed, step, stream, rows.shape, xp=np, offset=(row0, col0))
    np.testing.assert_array_equal(got, rows)
    word = reference()["word"]
    want = [
        [word(seed, step, stream, row0 + i, col0 + j) for j in range(rows.shape[1])]
        for i in range(rows.shape[0])
    ]
    np.testing.assert_array_equal(np.array(want, dtype=np.uint32), rows)


def test_philox_constants():
    lines = block("philox-constants")
    values = {line.split("=")[0].strip(): int(line.split("=")[1].split()[0], 0)
              for line in lines}  # fmt: skip
    assert values == {
        "M0": rng.PHILOX_M0,
        "M2": rng.PHILOX_M2,
        "W0": rng.PHILOX_W0,
        "W1": rng.PHILOX_W1,
        "ROUNDS": rng.PHILOX_ROUNDS,
    }
    ref = reference()
    assert (ref["M0"], ref["M2"], ref["W0"], ref["W1"]) == (
        rng.PHILOX_M0,
        rng.PHILOX_M2,
        rng.PHILOX_W0,
        rng.PHILOX_W1,
    )


@pytest.mark.parametrize("trial", range(3))
def test_reference_matches_core_on_random_blocks(trial):
    rs = np.random.default_rng(trial)
    seed = int(rs.integers(0, 2**63)) * 2 + 1
    step, stream = int(rs.integers(0, 2**32)), int(rs.integers(0, 2**32))
    row0, col0 = int(rs.integers(0, 2**32 - 3)), int(rs.integers(0, 2**33))
    got = rng.random_bits(seed, step, stream, (3, 7), xp=np, offset=(row0, col0))
    word = reference()["word"]
    want = [[word(seed, step, stream, row0 + i, col0 + j) for j in range(7)]
            for i in range(3)]  # fmt: skip
    np.testing.assert_array_equal(got, np.array(want, dtype=np.uint32))


def test_gaussian_table():
    lines = block("gaussian-table")
    entries = {}
    for line in lines:
        name, value = (s.strip() for s in line.split("=", 1))
        entries[name] = value.split()
    table = rng.gaussian_table()
    checked = 0
    for name, fields in entries.items():
        index = re.fullmatch(r"T\[(\d+)\]", name)
        if index is None:
            continue
        value = table[int(index.group(1))]
        assert str(value) == fields[0], name  # the shortest float32 repr
        if "bits" in fields:
            assert f"0x{int(value.view(np.uint32)):08x}" == fields[-1], name
        checked += 1
    assert checked == 4 and "T[0]" in entries
    digest = hashlib.sha256(table.astype("<f4").tobytes()).hexdigest()
    assert entries["SHA-256"] == [digest] == [rng.GAUSSIAN_TABLE_SHA256]


def test_float_words():
    draws = {"uniform": rng.uniform, "rademacher": rng.rademacher}
    draws["gaussian"] = rng.gaussian
    lines = block("floats")
    assert sorted(line.split()[0] for line in lines) == sorted(draws)
    for line in lines:
        name, *fields = line.split()
        got = draws[name](0, 0, 0, (1, len(fields)), xp=np)[0]
        assert len(fields) == 4 and got.dtype == np.float32
        assert [int(w) for w in got.view(np.uint32)] == hex_words(fields), name


def test_codes():
    values = {}
    for line in block("codes"):
        name, value = (s.strip() for s in line.split("=", 1))
        values[name] = int(value)
    assert values == {
        **{f"distribution {d}": i for i, d in enumerate(policy.DISTRIBUTIONS)},
        "format_version": state.FORMAT_VERSION,
        "rng_version": rng.RNG_VERSION,
    }
