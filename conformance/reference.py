"""An independent reference of FLORA, Adam(W) and Adafactor in plain numpy.

This module is a second implementation of what ``docs/spec.md`` prescribes, written
from the papers and the spec's documented choices, not from ``flora_core``. It
**never imports flora_core** (nor any adapter), so a mistake in the core cannot
leak into it: the conformance suite checks the core and every adapter against it
(``conformance/test_reference.py``).

It is deliberately plain: one parameter at a time, float32 numpy, simple loops,
no in-place tricks, no traced code. Speed does not matter here. (``run`` can also do
its arithmetic in float64, only to measure what float32 rounding does to a problem.)

Contents, each with its source:

- FLORA-RNG v1 (spec §2): Philox4x32-10 (Salmon et al., SC 2011) on uint64 numpy
  arrays, the counter layout, and the words-to-floats maps (gaussian table,
  rademacher sign).
- The projection ``A_i`` (spec §3.1) and the parameter policy (spec §1): matrix
  view, compressed axis, rank.
- FLORA (Hao, Cao, Mou, ICML 2024): Algorithm 1 (compressed gradient accumulation,
  mean over τ micro-batches) and Algorithm 2 (compressed momentum, resampled every κ
  updates, moved to the new projection with a transfer rule ``c · M A_old A_newᵀ``).
- Adam (Kingma & Ba, ICLR 2015) with decoupled weight decay (AdamW, Loshchilov &
  Hutter, ICLR 2019), its first moment compressed by Algorithm 2: FloraAdam, with
  the spec's projected second moment, its levelling at a resample, and the
  Adafactor-style factored second moment.
- Adafactor (Shazeer & Stern, ICML 2018) as ``optax.adafactor`` chains it
  (factored RMS scaling, block-RMS clipping, learning rate, parameter scale,
  momentum, weight decay), its momentum compressed by Algorithm 2: FloraAdafactor,
  in either clip order.

:func:`run` trains a conformance ``Problem`` (``conformance/problems.py``) and returns
the parameters after every update, like ``problems.oracle`` does with the core.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------
# FLORA-RNG v1: Philox4x32-10 and the projection (spec §2, §3.1)
# --------------------------------------------------------------------------------------

PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M2 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # bump of key word 0 between rounds
PHILOX_W1 = 0xBB67AE85  # bump of key word 1 between rounds
WORD = 0xFFFFFFFF

ROLE_MOMENTUM = 0
ROLE_ACCUMULATION = 1


def philox(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox4x32-10 on arrays of counters (uint64 arrays holding 32-bit words).

    A product of two 32-bit words fits exactly in uint64, so ``hi`` and ``lo`` are a
    shift and a mask.
    """
    x0, x1, x2, x3 = (np.asarray(x, dtype=np.uint64) for x in counter)
    k0, k1 = key
    for round_index in range(10):
        if round_index > 0:
            k0 = (k0 + PHILOX_W0) & WORD
            k1 = (k1 + PHILOX_W1) & WORD
        p0 = x0 * np.uint64(PHILOX_M0)
        p2 = x2 * np.uint64(PHILOX_M2)
        x0, x1, x2, x3 = (
            (p2 >> np.uint64(32)) ^ x1 ^ np.uint64(k0),
            p2 & np.uint64(WORD),
            (p0 >> np.uint64(32)) ^ x3 ^ np.uint64(k1),
            p0 & np.uint64(WORD),
        )
    return [x0, x1, x2, x3]


def words(seed: int, step: int, stream: int, rows: int, cols: int) -> np.ndarray:
    """The ``rows x cols`` uint32 words of ``(seed, step, stream)`` from (0, 0).

    Element ``(a, b)`` is word ``b % 4`` of Philox at counter
    ``(b // 4, a, step, stream)`` with key ``(low, high)`` half of the seed.
    """
    groups = (cols + 3) // 4
    a, g = np.meshgrid(np.arange(rows), np.arange(groups), indexing="ij")
    out = philox(
        [g, a, np.full_like(a, step), np.full_like(a, stream)],
        (seed & WORD, seed >> 32),
    )
    # word q of group g is column 4 g + q
    every = np.stack(out, axis=-1).reshape(rows, groups * 4)
    return every[:, :cols].astype(np.uint32)


@functools.lru_cache(maxsize=1)
def gaussian_table() -> np.ndarray:
    """``T[i] = float32(Φ⁻¹((i + 0.5) / 65536))``: Φ⁻¹ in float64, one rounding."""
    inverse = statistics.NormalDist().inv_cdf
    return np.array([inverse((i + 0.5) / 65536) for i in range(65536)], np.float32)


def draw(
    seed: int, step: int, stream: int, rows: int, cols: int, distribution: str
) -> np.ndarray:
    """float32 draws: ``T[w >> 16]`` (gaussian) or ``1 - 2 (w >> 31)`` (rademacher)."""
    w = words(seed, step, stream, rows, cols)
    if distribution == "gaussian":
        return gaussian_table()[w >> 16]
    if distribution == "rademacher":
        return (1.0 - 2.0 * (w >> 31)).astype(np.float32)
    raise ValueError(f"no draws for distribution {distribution!r}")


# --------------------------------------------------------------------------------------
# Parameter policy (spec §1)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parameter:
    """What the policy decides for one parameter, and its projections.

    ``rank`` is None when the parameter is not compressed (0-D or 1-D, or the
    compressed axis is not longer than the rank) or when the projection is the
    identity: in both cases it gets the exact base optimizer.
    """

    shape: tuple[int, ...]
    index: int
    seed: int
    rank: int | None
    axis: int | None
    distribution: str
    # the arithmetic's float type: float32 (the spec's); float64 only to measure
    # what float32 rounding alone does to a problem (NOTE [reference tolerances])
    real: type = np.float32

    @property
    def matrix(self) -> tuple[int, int]:
        """The ``(n, m)`` view: first axis by all the others."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def compressed(self) -> bool:
        return self.rank is not None

    @property
    def d(self) -> int:
        """Length of the compressed axis."""
        return self.matrix[self.axis]

    @property
    def compressed_shape(self) -> tuple[int, int]:
        """Shape of a compressed state: ``n x r`` (axis 1) or ``r x m`` (axis 0)."""
        n, m = self.matrix
        return (n, self.rank) if self.axis == 1 else (self.rank, m)

    def projection(self, index: int, role: int) -> np.ndarray:
        """``A_index`` of ``role``: ``r x d`` float32, draws times float32(1/sqrt(r))."""
        stream = (self.index << 2) | role
        z = draw(self.seed, index, stream, self.rank, self.d, self.distribution)
        return (z * np.float32(1.0 / math.sqrt(self.rank))).astype(self.real)


def parameter(
    shape: tuple[int, ...],
    index: int,
    *,
    rank: int,
    seed: int,
    distribution: str,
    axis: int | None = None,
    real: type = np.float32,
) -> Parameter:
    """The policy for an int rank: compress the smaller axis (the last on a tie, or
    the forced one) when it is longer than the rank; never 0-D or 1-D arrays."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or distribution == "identity":
        return Parameter(shape, index, seed, None, None, distribution, real)
    n, m = shape[0], math.prod(shape[1:])
    if axis is None:
        axis = 1 if m <= n else 0
    axis = axis % 2
    d = (n, m)[axis]
    if d <= rank:
        return Parameter(shape, index, seed, None, None, distribution, real)
    return Parameter(shape, index, seed, rank, axis, distribution, real)


# --------------------------------------------------------------------------------------
# FLORA: compress / decompress, Algorithm 2 (momentum) and Algorithm 1 (accumulation)
# --------------------------------------------------------------------------------------


def compress(g: np.ndarray, a: np.ndarray, axis: int) -> np.ndarray:
    """The compressed axis is multiplied by ``A``: ``G Aᵀ`` (axis 1), ``A G`` (axis 0)."""
    return g @ a.T if axis == 1 else a @ g


def decompress(c: np.ndarray, a: np.ndarray, axis: int) -> np.ndarray:
    """Back to the matrix view: ``C A`` (axis 1), ``Aᵀ C`` (axis 0)."""
    return c @ a if axis == 1 else a.T @ c


def transfer_factor(p: Parameter, rule: str) -> np.floating:
    """``c`` in ``M <- c · M (A_old A_newᵀ)``.

    ``γ = E‖X A_newᵀ A_new‖² / ‖X‖²``: ``1 + (d + 1)/r`` for gaussian entries of
    variance ``1/r``, ``1 + (d - 1)/r`` for rademacher ones (their ``AᵀA`` has an
    exact unit diagonal). ``paper`` (Algorithm 2 as printed): ``c = 1``; ``norm``
    keeps the expected norm: ``1/sqrt(γ)``; ``least_squares`` minimises the
    expected error ``c²γ - 2c + 1``: ``1/γ``.
    """
    extra = 1 if p.distribution == "gaussian" else -1
    gamma = 1.0 + (p.d + extra) / p.rank
    factor = {
        "paper": 1.0,
        "norm": 1.0 / math.sqrt(gamma),
        "least_squares": 1.0 / gamma,
    }
    return p.real(factor[rule])


def starts_new_projection(t: int, kappa: int) -> bool:
    """Update ``t`` (0-based) is the first on a new projection: ``t > 0, t % κ == 0``."""
    return t > 0 and t % kappa == 0


def flora_ema(
    moment: np.ndarray,
    u: np.ndarray,
    t: int,
    *,
    beta: float,
    kappa: int,
    p: Parameter,
    rule: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Algorithm 2 for update ``t`` of the float32 array ``u`` (parameter-shaped).

    Returns ``(moment, direction, a)``: the new moment (compressed, ``n x r`` or
    ``r x m``, when the parameter is), the decompressed direction
    (parameter-shaped) and the projection ``A_{t // κ}`` it lives on (None when
    the parameter is not compressed: then this is the plain EMA).
    """
    if not p.compressed:
        moment = beta * moment + (1 - beta) * u
        return moment, moment, None
    a = p.projection(t // kappa, ROLE_MOMENTUM)
    if starts_new_projection(t, kappa):
        a_old = p.projection(t // kappa - 1, ROLE_MOMENTUM)
        if p.axis == 1:  # M is n x r
            moment = transfer_factor(p, rule) * (moment @ a_old @ a.T)
        else:  # M is r x m
            moment = transfer_factor(p, rule) * (a @ a_old.T @ moment)
    fresh = compress(u.reshape(p.matrix), a, p.axis)
    moment = beta * moment + (1 - beta) * fresh
    return moment, decompress(moment, a, p.axis).reshape(p.shape), a


def flora_mean_gradient(
    micro_batch_grads: list[np.ndarray], cycle: int, tau: int, p: Parameter
) -> np.ndarray:
    """Algorithm 1: ``decompress(Σ_j compress(G_j, A_c), A_c) / τ``, ``A_c`` of role 1
    for cycle ``c`` (the number of updates already applied).

    ``micro_batch_grads`` may hold fewer than τ gradients (a parameter that missed
    micro-batches): the divisor stays τ, the mean over the cycle's micro-batches.
    """
    if not p.compressed:
        total = np.zeros(p.shape, p.real)
        for g in micro_batch_grads:
            total = total + g.astype(p.real)
        return total / p.real(tau)
    a = p.projection(cycle, ROLE_ACCUMULATION)
    total = np.zeros(p.compressed_shape, p.real)
    for g in micro_batch_grads:
        total = total + compress(g.astype(p.real).reshape(p.matrix), a, p.axis)
    return (decompress(total, a, p.axis) / p.real(tau)).reshape(p.shape)


# --------------------------------------------------------------------------------------
# FloraAdam: AdamW with Algorithm 2 as its first moment
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adam:
    """FloraAdam's hyper-parameters; the defaults are the spec's (§4.4)."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    kappa: int = 1000
    factored: bool = False
    second_moment: str = "projected"
    transfer: str = "least_squares"
    eps_before_bias_correction: bool = False  # Keras' "epsilon hat"


FACTOR_FLOOR = 1e-30  # added to the squares before the factored means


class AdamState:
    """One parameter's FloraAdam state."""

    def __init__(self, p: Parameter, h: Adam) -> None:
        self.t = 0
        self.m = np.zeros(p.compressed_shape if p.compressed else p.shape, p.real)
        self.factored = h.factored and len(p.shape) >= 2
        if self.factored:
            n, m = p.matrix
            self.v_row = np.zeros(n, p.real)
            self.v_col = np.zeros(m, p.real)
        else:
            self.v = np.zeros(p.shape, p.real)


def adam_update(
    g: np.ndarray, param: np.ndarray, s: AdamState, p: Parameter, h: Adam
) -> np.ndarray:
    """One FloraAdam update (to be added to ``param``); advances ``s``."""
    g = g.astype(p.real)
    t = s.t
    s.m, direction, a = flora_ema(
        s.m, g, t, beta=h.b1, kappa=h.kappa, p=p, rule=h.transfer
    )
    projected = h.second_moment == "projected" and p.compressed
    if projected:  # the gradient as the projection A_i sees it
        g_seen = decompress(compress(g.reshape(p.matrix), a, p.axis), a, p.axis)
        g_seen = g_seen.reshape(p.shape)
    else:
        g_seen = g
    if projected and starts_new_projection(t, h.kappa):
        # forget the old projection's pattern along the compressed axis
        if s.factored:
            if p.axis == 1:
                s.v_col = np.full_like(s.v_col, s.v_col.mean())
            else:
                s.v_row = np.full_like(s.v_row, s.v_row.mean())
        else:
            v = s.v.reshape(p.matrix)
            level = v.mean(axis=p.axis, keepdims=True)
            s.v = np.broadcast_to(level, p.matrix).reshape(p.shape).copy()
    if s.factored:
        sq = np.square(g_seen).reshape(p.matrix) + p.real(FACTOR_FLOOR)
        s.v_row = h.b2 * s.v_row + (1 - h.b2) * sq.mean(axis=1)
        s.v_col = h.b2 * s.v_col + (1 - h.b2) * sq.mean(axis=0)
        v = (np.outer(s.v_row, s.v_col) / s.v_row.mean()).reshape(p.shape)
    else:
        s.v = h.b2 * s.v + (1 - h.b2) * np.square(g_seen)
        v = s.v
    s.t = t + 1
    if h.eps_before_bias_correction:  # Kingma and Ba's alpha_t and epsilon hat
        alpha = np.sqrt(p.real(1 - h.b2 ** (t + 1))) / p.real(1 - h.b1 ** (t + 1))
        step = alpha * direction / (np.sqrt(v) + p.real(h.eps))
    else:
        m_hat = direction / p.real(1 - h.b1 ** (t + 1))
        v_hat = v / p.real(1 - h.b2 ** (t + 1))
        step = m_hat / (np.sqrt(v_hat) + p.real(h.eps))
    return -p.real(h.lr) * (step + p.real(h.weight_decay) * param)


# --------------------------------------------------------------------------------------
# FloraAdafactor: optax.adafactor's chain with Algorithm 2 as its momentum
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adafactor:
    """FloraAdafactor's hyper-parameters; the defaults are ``optax.adafactor``'s."""

    lr: float
    momentum: float | None = 0.9
    decay_rate: float = 0.8
    decay_offset: int = 0
    min_dim_size_to_factor: int = 128
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = True
    weight_decay_rate: float | None = None
    eps: float = 1e-30
    factored: bool = True
    kappa: int = 1000
    transfer: str = "least_squares"
    clip_after_momentum: bool = True


def factored_axes(shape: tuple[int, ...], h: Adafactor) -> tuple[int, int] | None:
    """``(second largest axis, largest axis)`` when the second largest is long enough;
    ties go to the lower index as the smaller (a stable ascending sort)."""
    if not h.factored or len(shape) < 2:
        return None
    by_size = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
    second, largest = by_size[-2], by_size[-1]
    if shape[second] < h.min_dim_size_to_factor:
        return None
    return second, largest


class AdafactorState:
    """One parameter's FloraAdafactor state."""

    def __init__(self, p: Parameter, h: Adafactor) -> None:
        self.t = 0
        self.axes = factored_axes(p.shape, h)
        if self.axes is None:
            self.v = np.zeros(p.shape, p.real)
        else:
            second, largest = self.axes
            self.v_row = np.zeros(np.delete(p.shape, largest), p.real)
            self.v_col = np.zeros(np.delete(p.shape, second), p.real)
        self.m = None
        if h.momentum is not None:
            shape = p.compressed_shape if p.compressed else p.shape
            self.m = np.zeros(shape, p.real)


def rms(x: np.ndarray) -> np.floating:
    return np.sqrt(np.mean(np.square(x)))


def adafactor_update(
    g: np.ndarray, param: np.ndarray, s: AdafactorState, p: Parameter, h: Adafactor
) -> np.ndarray:
    """One FloraAdafactor update (to be added to ``param``); advances ``s``."""
    g = g.astype(p.real)
    t = s.t
    decay = p.real(1.0 - (t + 1.0 - h.decay_offset) ** -h.decay_rate)
    sq = np.square(g) + p.real(h.eps)
    if s.axes is None:
        s.v = decay * s.v + (1 - decay) * sq
        u = g / np.sqrt(s.v)
    else:
        second, largest = s.axes
        s.v_row = decay * s.v_row + (1 - decay) * sq.mean(axis=largest)
        s.v_col = decay * s.v_col + (1 - decay) * sq.mean(axis=second)
        # v_row lost the largest axis: where did the second largest go?
        row_axis = second - 1 if second > largest else second
        row_level = s.v_row.mean(axis=row_axis, keepdims=True)
        row = np.sqrt(row_level / s.v_row)  # (v_row / mean)^(-1/2)
        col = 1 / np.sqrt(s.v_col)
        u = g * np.expand_dims(row, largest) * np.expand_dims(col, second)

    def momentum(u: np.ndarray) -> np.ndarray:
        s.m, direction, _ = flora_ema(
            s.m, u, t, beta=h.momentum, kappa=h.kappa, p=p, rule=h.transfer
        )
        return direction

    if h.momentum is not None and h.clip_after_momentum:  # the FLORA code's order
        u = momentum(u)
    if h.clipping_threshold is not None:
        u = u / max(p.real(1.0), rms(u) / p.real(h.clipping_threshold))
    u = p.real(h.lr) * u
    if h.multiply_by_parameter_scale:
        u = u * max(rms(param), p.real(1e-3))
    if h.momentum is not None and not h.clip_after_momentum:  # optax's order
        u = momentum(u)
    if h.weight_decay_rate is not None:
        u = u + p.real(h.weight_decay_rate) * param
    s.t = t + 1
    return -u


# --------------------------------------------------------------------------------------
# A whole conformance problem
# --------------------------------------------------------------------------------------


def hyper(problem: object) -> Adam | Adafactor:
    """The reference's hyper-parameters for a conformance ``Problem``.

    Only the fields a problem sets explicitly are read; everything else is this
    module's own (documented) default.
    """
    if problem.rule == "adam":
        return Adam(
            lr=problem.lr,
            weight_decay=problem.weight_decay,
            kappa=problem.kappa,
            factored=problem.factored,
            second_moment=problem.second_moment,
            transfer=problem.transfer,
            eps_before_bias_correction=problem.eps_before_bias_correction,
        )
    return Adafactor(
        lr=problem.lr,
        momentum=problem.momentum,
        min_dim_size_to_factor=problem.extra.get("min_dim_size_to_factor", 16),
        weight_decay_rate=problem.weight_decay or None,
        factored=problem.factored,
        kappa=problem.kappa,
        transfer=problem.transfer,
        clip_after_momentum=problem.clip_after_momentum,
    )


def run(problem: object, real: type = np.float32) -> list[list[np.ndarray]]:
    """Train ``problem``; the parameters after every update.

    ``real=np.float64`` does the arithmetic in float64 (the projections stay the
    float32 ``A_i``): how far float32 is from it measures the problem's conditioning.
    """
    h = hyper(problem)
    params = [np.asarray(x, real) for x in problem.initial_params()]
    plans = [
        parameter(
            shape,
            i,
            rank=problem.rank,
            seed=problem.seed,
            distribution=problem.projection,
            axis=problem.axis,
            real=real,
        )
        for i, shape in enumerate(problem.shapes)
    ]
    if isinstance(h, Adam):
        states = [AdamState(p, h) for p in plans]
        update = adam_update
    else:
        states = [AdafactorState(p, h) for p in plans]
        update = adafactor_update
    tau = problem.accumulation_steps
    absent = set(problem.absent)
    trajectory = []
    for t, micro_batches in enumerate(problem.grads()):
        for i, p in enumerate(plans):
            if tau > 1:  # the micro-batches that gave parameter i a gradient
                grads = [
                    batch[i]
                    for j, batch in enumerate(micro_batches)
                    if (t, j, i) not in absent
                ]
                g = flora_mean_gradient(grads, t, tau, p)
            else:
                g = micro_batches[0][i]
            params[i] = params[i] + update(g, params[i], states[i], p, h)
        trajectory.append([x.copy() for x in params])
    return trajectory
