"""FLORA-RNG v1 conformance: known answers, golden rows, layout, oracle, compilers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conformance.known_answers import GOLDEN_ROWS, KATS
from flora_core import rng

VECTORS = Path(__file__).parent / "vectors" / "rng.json"


def words(backend, x) -> np.ndarray:
    return backend.to_numpy(x).astype(np.uint32)


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_philox_known_answers(backend, counter, key, expected):
    out = rng.philox4x32(
        [backend.asarray(np.uint32(c)) for c in counter], key, xp=backend.xp
    )
    assert [int(words(backend, w)) for w in out] == list(expected)


def test_philox_accepts_int_counters(backend):
    out = rng.philox4x32(KATS[1][0], KATS[1][1], xp=backend.xp)
    assert [int(words(backend, w)) for w in out] == list(KATS[1][2])


def test_golden_rows(backend):
    got = words(backend, rng.random_bits(0, 0, 0, (2, 8), xp=backend.xp))
    assert [" ".join(f"{int(w):08x}" for w in row) for row in got] == GOLDEN_ROWS


def test_committed_vectors(backend):
    for case in json.loads(VECTORS.read_text()):
        got = rng.random_bits(
            case["seed"],
            case["step"],
            case["stream"],
            tuple(case["shape"]),
            xp=backend.xp,
            offset=tuple(case["offset"]),
        )
        expected = np.array(
            [[int(w, 16) for w in row] for row in case["words"]], np.uint32
        )
        np.testing.assert_array_equal(words(backend, got), expected)


def test_gaussian_table_hash():
    table = rng.gaussian_table()
    digest = hashlib.sha256(table.astype("<f4").tobytes()).hexdigest()
    assert digest == rng.GAUSSIAN_TABLE_SHA256
    assert table[0] == np.float32(-4.324919) and table.dtype == np.float32
    np.testing.assert_array_equal(table, -table[::-1])  # exactly antisymmetric


@pytest.mark.parametrize("trial", range(6))
def test_block_equals_slice_of_full_matrix(backend, trial):
    rs = np.random.default_rng(trial)
    rows, cols = int(rs.integers(1, 40)), int(rs.integers(1, 70))
    seed, step, stream = (
        int(rs.integers(0, 2**63)),
        int(rs.integers(0, 2**32)),
        int(rs.integers(0, 2**32)),
    )
    full = words(
        backend,
        rng.random_bits(seed, step, stream, (rows + 9, cols + 13), xp=backend.xp),
    )
    r0, c0 = int(rs.integers(0, 10)), int(rs.integers(0, 14))  # unaligned starts
    h, w = int(rs.integers(0, rows)) + 1, int(rs.integers(0, cols)) + 1
    block = rng.random_bits(seed, step, stream, (h, w), xp=backend.xp, offset=(r0, c0))
    np.testing.assert_array_equal(words(backend, block), full[r0 : r0 + h, c0 : c0 + w])


@pytest.mark.parametrize("draw", ["uniform", "rademacher", "gaussian"])
def test_floats_are_bit_identical_to_numpy(backend, draw):
    fn = getattr(rng, draw)
    got = backend.to_numpy(fn(99, 3, 17, (13, 21), xp=backend.xp, offset=(2, 5)))
    want = fn(99, 3, 17, (13, 21), xp=np, offset=(2, 5))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_word_to_float_constructions():
    w = rng.random_bits(5, 6, 7, (64, 64), xp=np)
    u = rng.uniform(5, 6, 7, (64, 64), xp=np)
    s = rng.rademacher(5, 6, 7, (64, 64), xp=np)
    g = rng.gaussian(5, 6, 7, (64, 64), xp=np)
    np.testing.assert_array_equal(
        u, ((w >> 8) | 1).astype(np.float32) * np.float32(2**-24)
    )
    np.testing.assert_array_equal(
        s, (1 - 2 * (w >> 31).astype(np.int64)).astype(np.float32)
    )
    np.testing.assert_array_equal(g, rng.gaussian_table()[w >> 16])
    assert u.min() > 0 and u.max() < 1


def test_traced_step_and_compiled_generation_match(backend):
    xp = backend.xp

    def draw(step):
        return rng.gaussian(11, step, 6, (16, 24), xp=xp)

    step = backend.asarray(np.int32(5))
    want = rng.gaussian(11, 5, 6, (16, 24), xp=np)
    for fn in (draw, backend.compile(draw)):
        got = backend.to_numpy(fn(step))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_tensorflow_raw_op_oracle():
    """Row r of FLORA-RNG v1 is TF's own Philox with counter (r << 32, stream << 32 | step)."""
    tf = pytest.importorskip("tensorflow")
    rs = np.random.default_rng(7)
    for _ in range(40):
        seed = int(rs.integers(0, 2**63)) * 2 + int(rs.integers(0, 2))
        step, stream = int(rs.integers(0, 2**32)), int(rs.integers(0, 2**32))
        row, cols = int(rs.integers(0, 2**32)), int(rs.integers(1, 50))
        oracle = tf.raw_ops.StatelessRandomUniformFullIntV2(
            shape=[cols],
            key=tf.constant([seed], tf.uint64),
            counter=tf.constant([row << 32, (stream << 32) | step], tf.uint64),
            alg=1,
            dtype=tf.uint32,
        ).numpy()
        ours = rng.random_bits(seed, step, stream, (1, cols), xp=np, offset=(row, 0))[0]
        np.testing.assert_array_equal(ours, oracle)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "0", True])
def test_bad_seed_is_named(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.random_bits(seed, 0, 0, (1, 4), xp=np)


@pytest.mark.parametrize(
    "name,kwargs", [("step", {"step": -1}), ("stream", {"stream": 2**32})]
)
def test_bad_counter_words_are_named(name, kwargs):
    args = {"seed": 0, "step": 0, "stream": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        rng.random_bits(args["seed"], args["step"], args["stream"], (1, 4), xp=np)


@pytest.mark.parametrize("trial", range(4))
def test_numpy_fast_path_equals_generic_path(trial):
    import array_api_compat.numpy as xp

    rs = np.random.default_rng(100 + trial)
    rows, groups = int(rs.integers(1, 50)), int(rs.integers(1, 3000))
    row0, group0 = int(rs.integers(0, 2**31)), int(rs.integers(0, 2**30))
    seed, step, stream = int(rs.integers(0, 2**63)), int(rs.integers(0, 2**32)), 12
    fast = rng._numpy_block_words(seed, step, stream, rows, row0, group0, groups)
    generic = rng._generic_block_words(
        seed, step, stream, rows, row0, group0, groups, xp, None
    )
    np.testing.assert_array_equal(fast, generic)


def test_native_word_path_equals_numpy(backend):
    """The backend's own integer path (CUDA and compiled code use it), bypassing any
    host fast path."""
    got = rng._generic_block_words(77, 5, 9, 13, 1000, 3, 11, backend.xp, None)
    want = rng._numpy_block_words(77, 5, 9, 13, 1000, 3, 11)
    np.testing.assert_array_equal(backend.to_numpy(got).astype(np.uint32), want)
