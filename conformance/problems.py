"""Conformance problems and the numpy oracle every adapter is checked against.

A :class:`Problem` is a small set of parameters (matrices of both orientations, a
vector, a conv kernel) with a fixed gradient stream: micro-batch ``j`` of update ``t``
has gradient ``grads[t][j][i]`` for parameter ``i``. Adapters reproduce it with the
linear loss ``sum_i sum(p_i * g_i)``, whose gradient is exactly ``g_i``, so every
framework sees the same gradients through its own backward pass.

The oracle runs the numpy core (``flora_core.rules`` and ``flora_core.accumulation``)
and records the parameters after every update. ``conformance/vectors/*.npz`` holds
these trajectories for ``PROBLEMS``; regenerate them with ``python -m
conformance.make_vectors`` (a changed vector needs a reason in the commit message).

``PROBLEMS`` draw bounded gradients (magnitudes in [0.5, 1.5]): they check that the
frameworks agree. ``REALISTIC`` problems draw gradients of realistic dynamic range
(NOTE [realistic gradients]) and cover resamples, both compressed axes and a forced
one, factored and full second moments, accumulation with parameters missing
micro-batches, every transfer rule, both clip orders, rademacher projections,
``second_moment="gradient"`` and Adafactor without momentum. Every problem, of
either kind, is checked against the independent numpy reference
(``conformance/reference.py``, by ``conformance/test_reference.py``); the realistic
ones have no stored vectors and ``tests/cross`` does not run them.
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
    momentum: float | None = 0.9  # FloraAdafactor's; None: no first moment
    axis: int | None = None  # forced compressed axis of every matrix (None: policy)
    second_moment: str = "projected"  # FloraAdam's
    eps_before_bias_correction: bool = False  # FloraAdam's (Keras' convention)
    gradients: str = "bounded"  # or "realistic" (see _realistic_gradients)
    # (t, j, i): parameter i gets no gradient in micro-batch j of update t (the
    # linear loss leaves it out; frameworks that cannot tell see zeros)
    absent: tuple[tuple[int, int, int], ...] = ()
    # of comparisons with the reference (NOTE [reference tolerances] in
    # conformance/test_reference.py): |got - want| <= atol + rtol |want| +
    # peak_rtol max|want| for each parameter
    rtol: float = 1e-4
    atol: float = 1e-5
    peak_rtol: float = 0.0

    def __post_init__(self) -> None:
        # torch skips a parameter without a gradient in its update, where the other
        # frameworks apply a zero gradient: only partial absence within a cycle is
        # the same update everywhere.
        tau = self.accumulation_steps
        for t in range(self.steps):
            for i in range(len(self.shapes)):
                if all((t, j, i) in self.absent for j in range(tau)):
                    raise ValueError(
                        f"{self.name}: parameter {i} has no gradient at {t}"
                    )

    def initial_params(self) -> list[np.ndarray]:
        """Standard normal; realistic problems start 1-D parameters (biases) at zero,
        where Adafactor's parameter scale ``max(rms(p), 1e-3)`` is at its floor."""
        rs = np.random.default_rng(self.data_seed)
        params = [rs.standard_normal(s).astype(np.float32) for s in self.shapes]
        if self.gradients == "realistic":
            params = [np.zeros_like(p) if p.ndim == 1 else p for p in params]
        return params

    def grads(self) -> list[list[list[np.ndarray]]]:
        """``grads[t][j][i]``: update t, micro-batch j, parameter i."""
        rs = np.random.default_rng(self.data_seed + 1)
        if self.gradients == "realistic":
            return _realistic_gradients(self, rs)
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
                s,
                i,
                rank=self.rank,
                seed=self.seed,
                distribution=self.projection,
                axis=self.axis,
            )
            for i, s in enumerate(self.shapes)
        ]

    def config(self) -> rules.AdamConfig | rules.AdafactorConfig:
        if self.rule == "adam":
            return rules.AdamConfig(
                kappa=self.kappa, factored=self.factored,
                weight_decay=self.weight_decay, transfer=self.transfer,
                second_moment=self.second_moment,
                eps_before_bias_correction=self.eps_before_bias_correction,
            )  # fmt: skip
        return rules.AdafactorConfig(
            momentum=self.momentum,
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


# NOTE [realistic gradients]: a second gradient stream, for the checks against the
# independent reference (``conformance/reference.py``), with what the bounded one
# leaves out: per-row and per-column log-normal scales (sigma 1), parameters whose
# gradients differ in size by about nine orders of magnitude (down to below Adam's
# eps), 5% of entries shrunk by 1e-4 to 1e-9, 3% exact zeros and 8% dead rows
# (always zero), and a rank-2 component that rotates slowly (DRIFT radians per
# update) on top of the noise, so the momentum has a direction to carry across a
# resample. The 1-D parameters (biases) start at zero.
REALISTIC_SHAPES: tuple[tuple[int, ...], ...] = (
    (48, 40),  # axis 1 compressed
    (24, 56),  # axis 0
    (40,),  # never compressed
    (20, 3, 24),  # (20, 72): axis 0; Adafactor factors axes 0 and 2 of the shape
    (5, 24),  # 5 <= rank: not compressed (exact base optimizer, factored in 2-D)
)
LAYER_SCALES = (1.0, 1e-3, 10.0, 3e-8, 0.3)
DRIFT = 0.2


def _realistic_gradients(
    problem: Problem, rs: np.random.Generator
) -> list[list[list[np.ndarray]]]:
    """``grads[t][j][i]`` of NOTE [realistic gradients]."""
    layers = []
    for i, shape in enumerate(problem.shapes):
        n, m = shape[0], int(np.prod(shape[1:]))
        layers.append(
            {
                "scale": LAYER_SCALES[i % len(LAYER_SCALES)]
                * np.exp(rs.standard_normal((n, 1)))
                * np.exp(rs.standard_normal((1, m))),
                "u": rs.standard_normal((2, n, 2)),
                "v": rs.standard_normal((2, m, 2)),
                "dead": rs.random(n) < 0.08,
            }
        )
    absent = set(problem.absent)
    tau = problem.accumulation_steps
    grads = []
    for t in range(problem.steps):
        micro_batches = []
        for j in range(tau):
            cos, sin = np.cos(DRIFT * (t + j / tau)), np.sin(DRIFT * (t + j / tau))
            batch = []
            for i, (shape, layer) in enumerate(
                zip(problem.shapes, layers, strict=True)
            ):
                u, v = layer["u"], layer["v"]
                signal = (cos * u[0] + sin * u[1]) @ (cos * v[0] - sin * v[1]).T
                g = layer["scale"] * (signal + rs.standard_normal(signal.shape))
                near = rs.random(g.shape) < 0.05
                g[near] *= 10.0 ** rs.uniform(-9, -4, size=int(near.sum()))
                g[rs.random(g.shape) < 0.03] = 0.0
                g[layer["dead"]] = 0.0
                if (t, j, i) in absent:
                    g = np.zeros_like(g)
                batch.append(g.reshape(shape).astype(np.float32))
            micro_batches.append(batch)
        grads.append(micro_batches)
    return grads


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


def _realistic(name: str, rule: str, **fields: Any) -> Problem:
    fields = {"steps": 10, "kappa": 3, "shapes": REALISTIC_SHAPES, **fields}
    return Problem(name, rule, gradients="realistic", **fields)


# Forcing axis 0 would be an error for (5, 24): its axis 0 is not longer than the rank.
FORCED_AXIS_0_SHAPES = tuple(s for s in REALISTIC_SHAPES if s != (5, 24))
ABSENT = ((0, 1, 1), (1, 0, 2), (1, 2, 2), (3, 1, 0), (3, 2, 3))

# Problems only checked against the independent reference
# (conformance/test_reference.py), not stored as vectors nor run by tests/cross.
REALISTIC: dict[str, Problem] = {
    p.name: p
    for p in (
        # NOTE [reference tolerances]: entries where |ĝ| is near eps
        _realistic("adam_realistic", "adam", weight_decay=0.01, atol=5e-5),
        _realistic(
            "adam_realistic_eps_before_bias_correction",
            "adam",
            eps_before_bias_correction=True,
            atol=5e-5,
        ),
        _realistic(
            "adam_realistic_factored_axis0",
            "adam",
            factored=True,
            transfer="norm",
            axis=0,
            kappa=2,
            shapes=FORCED_AXIS_0_SHAPES,
        ),
        # NOTE [reference tolerances]: v from the raw g while m comes from ĝ
        _realistic(
            "adam_realistic_gradient_moment",
            "adam",
            second_moment="gradient",
            peak_rtol=1e-5,
        ),
        _realistic(
            "adam_realistic_accumulate_rademacher",
            "adam",
            steps=6,
            accumulation_steps=3,
            kappa=2,
            projection="rademacher",
            absent=ABSENT,
        ),
        _realistic(
            "adafactor_realistic", "adafactor", factored=True, weight_decay=0.01
        ),
        _realistic(
            "adafactor_realistic_optax_order_axis1",
            "adafactor",
            clip_after_momentum=False,
            transfer="paper",
            axis=1,
        ),
        _realistic(
            "adafactor_realistic_accumulate_no_momentum",
            "adafactor",
            factored=True,
            steps=6,
            accumulation_steps=3,
            momentum=None,
            absent=ABSENT,
        ),
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
