"""Which parameters are compressed, along which axis and at which rank: the only copy.

Every adapter calls :func:`plan` for each parameter, in the host's canonical order, and
keeps the returned :class:`CompressionPlan`; nothing else decides compression.

Rules (docs/spec.md §3-4):
  * A parameter of shape ``(n, m)`` is viewed as a matrix; arrays of more dimensions
    as ``(shape[0], prod(shape[1:]))``. 0-D and 1-D parameters are never compressed.
  * The compressed axis (size ``d``) is the smaller one, the last on ties, unless the
    user forces ``axis``; the state keeps the other axis (size ``k``): ``k x r``.
  * ``rank="auto"`` (the default) gives ``r = min(256, d // 4)`` when ``d >= 32``
    (so an ordinary model's weight matrices are compressed 4x or more);
    ``rank=None`` never compresses; an int ``r`` compresses when ``d > r``.
    A parameter the rank does not compress gets the exact base optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flora_core.rng import check_seed

AUTO_RANK_CAP = 256
AUTO_RANK_DIVISOR = 4
AUTO_MIN_DIM = 32
DISTRIBUTIONS = ("gaussian", "rademacher", "identity")
ROLE_MOMENTUM = 0
ROLE_ACCUMULATION = 1
MAX_PARAM_INDEX = (1 << 30) - 1

RankSpec = int | str | None


def check_rank(rank: object) -> RankSpec:
    """``rank`` as given if valid (``"auto"``, None or an int >= 1), else a clear error."""
    if rank is None or rank == "auto":
        return rank  # type: ignore[return-value]
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(
            f"Invalid rank: {rank!r} (expected an int >= 1, 'auto' or None)"
        )
    if rank < 1:
        raise ValueError(f"Invalid rank: {rank} (expected an int >= 1, 'auto' or None)")
    return rank


def check_distribution(distribution: object) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown projection distribution {distribution!r}; expected one of {DISTRIBUTIONS}"
        )
    return distribution  # type: ignore[return-value]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D view ``(shape[0], prod(shape[1:]))`` of an array of >= 2 dims, else None."""
    if len(shape) < 2:
        return None
    return int(shape[0]), int(math.prod(shape[1:]))


def default_axis(n: int, m: int) -> int:
    """Compress the smaller axis; the last one on ties."""
    return 0 if n < m else 1


def auto_rank(dim: int) -> int | None:
    """The ``rank="auto"`` rule for a compressed axis of size ``dim`` (None: too small)."""
    if dim < AUTO_MIN_DIM:
        return None
    return min(AUTO_RANK_CAP, dim // AUTO_RANK_DIVISOR)


@dataclass(frozen=True)
class CompressionPlan:
    """Static facts about one parameter that regenerate every projection it uses.

    Attributes:
        shape: the parameter's shape.
        param_index: its position among all parameters given to the optimizer.
        seed: the uint64 RNG seed.
        rank: ``r``, or None when the parameter is not compressed.
        axis: the compressed axis of the matrix view (0 or 1), or None.
        distribution: "gaussian", "rademacher" or "identity".
    """

    shape: tuple[int, ...]
    param_index: int
    seed: int
    rank: int | None
    axis: int | None
    distribution: str

    @property
    def compressed(self) -> bool:
        return self.rank is not None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        view = matrix_shape(self.shape)
        if view is None:
            raise ValueError(f"A parameter of shape {self.shape} has no matrix view")
        return view

    @property
    def dim(self) -> int:
        """``d``, the size of the compressed axis."""
        assert self.axis is not None
        return self.matrix_shape[self.axis]

    @property
    def base_stream(self) -> int:
        """``param_index << 2``; the RNG stream of a role is ``base_stream | role``."""
        return self.param_index << 2

    def stream(self, role: int) -> int:
        return self.base_stream | role

    @property
    def batch(self) -> tuple[int, ...]:
        """Leading batch axes of the arrays this plan's rules see: none (see
        :class:`StackedPlan`)."""
        return ()

    @property
    def state_shape(self) -> tuple[int, int]:
        """Shape of a compressed state (momentum or accumulator) of this parameter."""
        n, m = self.matrix_shape
        if self.distribution == "identity":
            return n, m
        assert self.rank is not None
        return (n, self.rank) if self.axis == 1 else (self.rank, m)


@dataclass(frozen=True)
class StackedPlan(CompressionPlan):
    """``B`` parameters that share a plan, updated as one stack (a leading axis).

    NOTE [stacked plans]: members differ only in ``param_index`` (so in their RNG
    streams). Every rule then runs once on arrays of shape ``(B, *shape)`` (states
    ``(B, *state_shape)``): the projections of all members come from one RNG call
    with a tuple of streams (NOTE [stacked streams]), compress / decompress /
    transfer are batched matmuls, reductions run over the trailing (per-member)
    axes. Member ``b`` of the result equals the member's own unstacked update up to
    float summation order. ``param_index`` is the first member's; ``shape``,
    ``matrix_shape``, ``dim`` and ``state_shape`` are per member.
    """

    param_indices: tuple[int, ...] = ()

    @property
    def batch(self) -> tuple[int, ...]:
        return (len(self.param_indices),)

    def stream(self, role: int) -> tuple[int, ...]:  # type: ignore[override]
        return tuple((i << 2) | role for i in self.param_indices)

    @property
    def members(self) -> list[CompressionPlan]:
        return [
            CompressionPlan(
                self.shape, i, self.seed, self.rank, self.axis, self.distribution
            )
            for i in self.param_indices
        ]


def stack_plans(plans: list[CompressionPlan]) -> StackedPlan:
    """One :class:`StackedPlan` for plans that differ only in ``param_index``."""
    if not plans:
        raise ValueError("stack_plans needs at least one plan")
    first = plans[0]
    for other in plans[1:]:
        same = (other.shape, other.seed, other.rank, other.axis, other.distribution)
        if same != (
            first.shape,
            first.seed,
            first.rank,
            first.axis,
            first.distribution,
        ):
            raise ValueError(
                f"Cannot stack plans of parameters {first.param_index} and "
                f"{other.param_index}: {first} != {other} beyond param_index"
            )
    return StackedPlan(
        first.shape, first.param_index, first.seed, first.rank, first.axis,
        first.distribution, tuple(p.param_index for p in plans),
    )  # fmt: skip


def should_compress(
    shape: tuple[int, ...],
    rank: RankSpec,
    *,
    axis: int | None = None,
    exclude: bool = False,
) -> bool:
    """Whether a parameter of ``shape`` gets compressed states (see module docstring)."""
    return _resolve(shape, rank, axis, exclude) is not None


def _resolve(
    shape: tuple[int, ...], rank: RankSpec, axis: int | None, exclude: bool
) -> tuple[int, int] | None:
    """``(rank, axis)`` when compressed, else None; validates a forced axis."""
    view = matrix_shape(tuple(shape))
    if exclude or rank is None or view is None:
        return None
    if axis is not None and axis not in (0, 1, -1):
        raise ValueError(f"Invalid axis: {axis!r} (expected 0, 1, -1 or None)")
    chosen = default_axis(*view) if axis is None else axis % 2
    dim = view[chosen]
    if rank == "auto":
        r = auto_rank(dim)
        return None if r is None else (r, chosen)
    assert isinstance(rank, int)
    if rank >= dim:
        if axis is not None:
            raise ValueError(
                f"Invalid rank {rank} for axis {axis} of a parameter of shape {tuple(shape)}:"
                f" the rank must be smaller than that axis ({dim})"
            )
        return None
    return rank, chosen


def plan(
    shape: tuple[int, ...],
    param_index: int,
    *,
    rank: RankSpec = "auto",
    seed: int = 0,
    axis: int | None = None,
    distribution: str = "gaussian",
    exclude: bool = False,
) -> CompressionPlan:
    """The :class:`CompressionPlan` of one parameter (the single compression policy)."""
    check_rank(rank)
    check_distribution(distribution)
    seed = check_seed(seed)
    if isinstance(param_index, bool) or not isinstance(param_index, int):
        raise TypeError(f"Invalid param_index: {param_index!r}")
    if not 0 <= param_index <= MAX_PARAM_INDEX:
        raise ValueError(
            f"Invalid param_index: {param_index} (expected 0..{MAX_PARAM_INDEX})"
        )
    shape = tuple(int(s) for s in shape)
    resolved = _resolve(shape, rank, axis, exclude)
    r, ax = (None, None) if resolved is None else resolved
    return CompressionPlan(shape, param_index, seed, r, ax, distribution)


def check_unique_streams(plans: list[CompressionPlan]) -> None:
    """Raise if two parameters would draw the same RNG streams."""
    seen: dict[tuple[int, int], int] = {}
    for position, p in enumerate(plans):
        key = (p.seed, p.param_index)
        if key in seen:
            raise ValueError(
                f"Parameters {seen[key]} and {position} were given the same stream "
                f"(param_index={p.param_index}, seed={p.seed}); indices must be unique"
            )
        seen[key] = position
