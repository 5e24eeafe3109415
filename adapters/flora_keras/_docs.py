"""Hyper-parameter documentation shared by the Flora Keras optimizers (written once).

Each optimizer's docstring holds the placeholders ``{{flora_args}}`` and
``{{base_optimizer_keyword_args}}``; :func:`interpolate` fills them in at import.
"""

from __future__ import annotations

from keras.optimizers import Optimizer

FLORA_ARGS = """rank: `"auto"` (default), `None` or an int `r >= 1`. Which weights get
            compressed states and how small: `"auto"` compresses a weight whose
            smaller axis of its `(shape[0], prod(shape[1:]))` matrix view has
            `d >= 32` entries to `r = min(256, d // 4)`; an int compresses every
            weight with `d > r`; `None` compresses nothing (exact base optimizer).
            Biases, norms and other 1-D weights are never compressed.
        kappa: int >= 1, default 1000. The random projection of the momentum is
            redrawn every `kappa` updates and the momentum transferred onto it
            (FLORA Algorithm 2).
        transfer: `"least_squares"` (default), `"norm"` or `"paper"`: how the
            momentum moves onto a new projection. `"least_squares"` scales it by
            `1/γ`, `γ = 1 + (d+1)/r` (the least expected error; stable at any
            `kappa`), `"norm"` by `1/sqrt(γ)` (keeps its norm), `"paper"` not at all
            (Algorithm 2 as printed: each transfer multiplies the norm by about
            `sqrt(d/r)`; stable only while `beta**kappa * sqrt(d/r) << 1`).
        seed: int in `[0, 2**64)`, default 0. With the position of a weight in the
            variable list the optimizer is built with, it determines every
            projection (FLORA-RNG v1): two optimizers with the same seed, given
            the same weights in the same order, draw the same projections on any
            Keras backend and in flora_torch / flora_optax.
        projection: `"gaussian"` (default), `"rademacher"`, or `"identity"` (no
            compression: a testing mode that reduces Flora to its base optimizer).
        accumulation_steps: `None` (default) or an int >= 1. Compressed gradient
            accumulation (FLORA Algorithm 1): each call to `apply` adds the
            gradient, compressed with the projection of the current cycle, to a
            compressed `acc` slot, and every `accumulation_steps`-th call applies
            one update with the decompressed mean and resets `acc`; the weights
            do not change in between. As with Keras' own
            `gradient_accumulation_steps`: `optimizer.iterations` counts the
            updates applied (`optimizer._iterations` the calls, which learning-rate
            schedules read), weights marked `overwrite_with_gradient` keep the
            cycle's element-wise maximum, written on the applied step, and
            `clipnorm`, `clipvalue` and `global_clipnorm` clip the accumulated mean
            (the gradient the update uses), not each micro-batch. Use this instead
            of `gradient_accumulation_steps`, which allocates full-size accumulators
            and is rejected here."""

BASE_NOTE = """Other keyword arguments are those of `keras.optimizers.Optimizer`
            (`name`, `clipnorm`, `clipvalue`, `global_clipnorm`, `use_ema`,
            `ema_momentum`, `ema_overwrite_frequency`, `loss_scale_factor`). With
            `accumulation_steps`, clipping applies to the accumulated mean."""


def interpolate(cls: type[Optimizer]) -> type[Optimizer]:
    """Fill the shared placeholders of ``cls.__doc__`` (a class decorator)."""
    if cls.__doc__ is not None:
        cls.__doc__ = cls.__doc__.replace("{{flora_args}}", FLORA_ARGS).replace(
            "{{base_optimizer_keyword_args}}", BASE_NOTE
        )
    return cls
