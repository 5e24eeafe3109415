"""Conformance problems and the numpy oracle every adapter is checked against.

A :class:`Problem` is a small set of parameters (matrices of both orientations, a
vector, a conv kernel) with a fixed gradient stream: micro-batch ``j`` of update ``t``
has gradient ``grads[t][j][i]`` for parameter ``i``. Adapters reproduce it with the
linear loss ``sum_i sum(p_i * g_i)``, whose gradient is exactly ``g_i``, so every
framework sees the same gradients through its own backward pass.

The oracle runs the numpy core (``flora_core.rules`` and ``flora_core.accumulation``)
and records the parameters after every update. ``conformance/vectors/*.npz`` holds
these trajectories; regenerate them with ``python -m conformance.make_vectors`` (a
changed vector needs a reason in the commit message).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flora_core import accumulation, policy, rules

SHAPES: tuple[tuple[int, ...], ...] = ((48, 40), (24, 56), (40,), (16, 4, 3, 3))


@dataclass(frozen=True)
class Problem:
    """One conformance scenario (see the module docstring)."""

    name: str
    rule: str  # "adam" or "adafactor"
    steps: int = 7
    accumulation_steps: int = 1
    rank: int = 6
    kappa: int = 3
    seed: int = 1234
    lr: float = 0.02
    projection: str = "gaussian"
    factored: bool = False
    weight_decay: float = 0.0
    transfer: str = rules.DEFAULT_TRANSFER
    clip_after_momentum: bool = True
    shapes: tuple[tuple[int, ...], ...] = SHAPES
    data_seed: int = 0
    extra: dict = field(default_factory=dict)

    def initial_params(self) -> list[np.ndarray]:
        rs = np.random.default_rng(self.data_seed)
        return [rs.standard_normal(s).astype(np.float32) for s in self.shapes]

    def grads(self) -> list[list[list[np.ndarray]]]:
        """``grads[t][j][i]``: update t, micro-batch j, parameter i."""
        rs = np.random.default_rng(self.data_seed + 1)
        return [
            [
                [_bounded_gradient(rs, s) for s in self.shapes]
                for _ in range(self.accumulation_steps)
            ]
            for _ in range(self.steps)
        ]

    def plans(self) -> list[policy.CompressionPlan]:
        return [
            policy.plan(
                s, i, rank=self.rank, seed=self.seed, distribution=self.projection
            )
            for i, s in enumerate(self.shapes)
        ]

    def config(self) -> rules.AdamConfig | rules.AdafactorConfig:
        if self.rule == "adam":
            return rules.AdamConfig(
                kappa=self.kappa, factored=self.factored,
                weight_decay=self.weight_decay, transfer=self.transfer,
            )  # fmt: skip
        return rules.AdafactorConfig(
            kappa=self.kappa,
            transfer=self.transfer,
            clip_after_momentum=self.clip_after_momentum,
            factored=self.factored,
            min_dim_size_to_factor=self.extra.get("min_dim_size_to_factor", 16),
            weight_decay_rate=self.weight_decay or None,
        )


def _bounded_gradient(rs: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random signs times magnitudes in [0.5, 1.5].

    NOTE [conditioning]: with a compressed first moment, ``m / sqrt(v)`` is unbounded
    where a gradient element is near zero (``m`` comes from the projection, not from
    that element), so a gaussian gradient stream amplifies float32 rounding by 1e4
    and cross-framework comparisons would measure conditioning, not plumbing. For
    the same reason the Adam accumulation problem uses the factored second moment:
    a decompressed accumulated gradient has near-zero elements of its own.
    """
    signs = rs.choice(np.array([-1.0, 1.0], dtype=np.float32), size=shape)
    return (signs * rs.uniform(0.5, 1.5, size=shape)).astype(np.float32)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("adam", "adam", weight_decay=0.01),
        Problem("adam_factored", "adam", factored=True),
        Problem("adafactor", "adafactor", factored=True),
        Problem(
            "adam_accumulate", "adam", steps=5, accumulation_steps=3, factored=True
        ),
        Problem(
            "adafactor_accumulate",
            "adafactor",
            steps=5,
            accumulation_steps=3,
            factored=True,
        ),
        Problem("adam_rademacher", "adam", projection="rademacher"),
    )
}


def oracle(
    problem: Problem, *, traced_count: bool = False, backend: Any = None
) -> list[list[np.ndarray]]:
    """The core's parameters after each update of ``problem`` (numpy unless ``backend``).

    ``traced_count=True`` keeps ``count`` as an array, exercising the ``where``
    gating that jitted adapters use, instead of Python branches.
    """
    if backend is None:
        import array_api_compat.numpy as xp

        asarray, to_numpy = xp.asarray, np.array
    else:
        xp, asarray, to_numpy = backend.xp, backend.asarray, backend.to_numpy
    plans, config = problem.plans(), problem.config()
    rule = rules.flora_adam if problem.rule == "adam" else rules.flora_adafactor
    init = (
        rules.flora_adam_init if problem.rule == "adam" else rules.flora_adafactor_init
    )
    states = [init(p, config, xp=xp) for p in plans]
    if not traced_count:
        for s in states:
            s["count"] = 0
    params = [asarray(p) for p in problem.initial_params()]
    tau = problem.accumulation_steps
    trajectory = []
    for t, micro_batches in enumerate(problem.grads()):
        for i, plan in enumerate(plans):
            if tau > 1:
                acc = xp.zeros(accumulation.accumulator_shape(plan), dtype=xp.float32)
                for grads in micro_batches:
                    g = asarray(grads[i])
                    acc = accumulation.accumulate(acc, g, t, plan=plan, xp=xp)
                grad = accumulation.accumulated_gradient(acc, t, tau, plan=plan, xp=xp)
            else:
                grad = asarray(micro_batches[0][i])
            update, states[i] = rule(
                grad,
                states[i],
                params[i],
                plan=plan,
                config=config,
                lr=problem.lr,
                xp=xp,
            )
            params[i] = params[i] + update
        trajectory.append([to_numpy(p) for p in params])
    return trajectory
