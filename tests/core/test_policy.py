"""The single compression policy."""

from __future__ import annotations

import pytest

from flora_core import policy


@pytest.mark.parametrize(
    "shape,rank,expected",
    [
        ((768, 768), "auto", (192, 1)),  # ties: the last axis
        ((768, 3072), "auto", (192, 0)),  # the smaller axis
        ((50257, 768), "auto", (192, 1)),
        ((4096, 4096), "auto", (256, 1)),  # capped
        ((16, 16), "auto", None),  # too small for auto
        ((768,), "auto", None),  # vectors never
        ((128, 8, 3, 3), "auto", (18, 1)),  # conv kernel viewed as (128, 72)
        ((64, 64), 64, None),  # rank >= d: exact base optimizer
        ((64, 64), None, None),
        ((64, 128), 8, (8, 0)),
    ],
)
def test_rank_and_axis(shape, rank, expected):
    plan = policy.plan(shape, 0, rank=rank)
    assert (None if plan.rank is None else (plan.rank, plan.axis)) == expected
    assert policy.should_compress(shape, rank) == (expected is not None)


def test_default_compresses_an_ordinary_model():
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768,)]
    assert [policy.plan(s, i).compressed for i, s in enumerate(shapes)] == [
        True
    ] * 4 + [False]


@pytest.mark.parametrize(
    "axis,state_shape", [(0, (8, 40)), (1, (30, 8)), (None, (8, 40))]
)
def test_state_shape(axis, state_shape):
    assert policy.plan((30, 40), 0, rank=8, axis=axis).state_shape == state_shape


def test_exclude_and_streams():
    plan = policy.plan((64, 64), 5, rank=8, exclude=True)
    assert not plan.compressed
    assert policy.plan((64, 64), 5).stream(1) == (5 << 2) | 1
