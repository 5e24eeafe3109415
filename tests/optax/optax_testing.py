"""Helpers of the flora_optax tests: a mixed pytree, bounded gradients, training.

Gradients are random signs times magnitudes in [0.5, 1.5] (see NOTE [conditioning]
in ``conformance/problems.py``): FloraAdam's ``m / sqrt(v)`` amplifies rounding
where a gradient element is near zero, which would make float comparisons measure
conditioning instead of plumbing.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SHAPES = {
    "dense": {"kernel": (48, 40), "bias": (40,)},
    "wide": (24, 56),
    "conv": (16, 4, 3, 3),
    "scale": (),
}


SMALL = {"w": (48, 40), "b": (40,)}


def make_params(dtype: Any = jnp.float32, seed: int = 0, shapes: Any = None) -> Any:
    rs = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rs.standard_normal(s), dtype),
        SHAPES if shapes is None else shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def bounded(rs: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    signs = rs.choice(np.array([-1.0, 1.0]), size=shape)
    return jnp.asarray(signs * rs.uniform(0.5, 1.5, size=shape), dtype)


def make_grads(params: Any, steps: int, seed: int = 1) -> list[Any]:
    rs = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: bounded(rs, p.shape, p.dtype), params)
        for _ in range(steps)
    ]


def train(tx: optax.GradientTransformation, params: Any, grads: list[Any],
          jit: bool = True) -> tuple[Any, Any, list[Any]]:  # fmt: skip
    """Apply ``tx`` to ``grads``; returns (params, state, updates of every step)."""

    def step(g: Any, state: Any, p: Any) -> tuple[Any, Any, Any]:
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, updates

    run = jax.jit(step) if jit else step
    state, history = tx.init(params), []
    for g in grads:
        params, state, updates = run(g, state, params)
        history.append(updates)
    return params, state, history


def assert_trees_close(got: Any, want: Any, rtol: float, atol: float) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (
            g.shape,
            w.shape,
            g.dtype,
            w.dtype,
        )
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol)  # fmt: skip


def assert_trees_equal(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@contextlib.contextmanager
def log_compilations() -> Iterator[list[str]]:
    """The XLA compilations that happen inside the block (``jax.log_compiles``)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if re.search(r"Finished .* compilation", message):
                messages.append(message)

    handler, logger = Collect(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield messages
    finally:
        logger.removeHandler(handler)
