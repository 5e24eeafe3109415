"""The portable optimizer-state schema (DESIGN §5, normative names).

Per parameter, plain arrays: ``count``, ``mu``, ``nu`` or ``nu_row``/``nu_col``, ``acc``
and ``micro_step`` (accumulation), plus the metadata that regenerates every projection:
``seed``, ``stream``, ``rank``, ``axis``, ``distribution``, ``rng_version``. The same
schema fills torch state dicts, Optax NamedTuples and Keras variables; this module
holds the flat, framework-free form that moves between them.

Flat layout (a ``dict[str, np.ndarray]``, savable as npz or safetensors)::

    flora.format_version          int64 scalar, FORMAT_VERSION
    flora.num_params              int64 scalar
    param.{param_index}.{field}   one array per field

``stream`` is the parameter's base stream ``param_index << 2``; role r uses
``stream | r``. ``rank`` and ``axis`` are -1 for an uncompressed parameter; the
distribution is coded by its position in ``policy.DISTRIBUTIONS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flora_core import _xp
from flora_core.policy import DISTRIBUTIONS, CompressionPlan
from flora_core.rng import RNG_VERSION

FORMAT_VERSION = 1
ARRAY_FIELDS = ("count", "mu", "nu", "nu_row", "nu_col", "acc", "micro_step")
METADATA_FIELDS = (
    "seed",
    "stream",
    "rank",
    "axis",
    "distribution",
    "rng_version",
    "shape",
)


def plan_metadata(plan: CompressionPlan) -> dict[str, np.ndarray]:
    """The metadata arrays of one parameter's plan."""
    return {
        "seed": np.asarray(plan.seed, dtype=np.uint64),
        "stream": np.asarray(plan.base_stream, dtype=np.int64),
        "rank": np.asarray(-1 if plan.rank is None else plan.rank, dtype=np.int64),
        "axis": np.asarray(-1 if plan.axis is None else plan.axis, dtype=np.int64),
        "distribution": np.asarray(
            DISTRIBUTIONS.index(plan.distribution), dtype=np.int64
        ),
        "rng_version": np.asarray(RNG_VERSION, dtype=np.int64),
        "shape": np.asarray(plan.shape, dtype=np.int64),
    }


def export_state(
    plans: Sequence[CompressionPlan], states: Sequence[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """Flatten per-parameter states (any backend, ints allowed) into the portable form."""
    if len(plans) != len(states):
        raise ValueError(f"{len(plans)} plans but {len(states)} states")
    flat: dict[str, np.ndarray] = {
        "flora.format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
        "flora.num_params": np.asarray(len(plans), dtype=np.int64),
    }
    for plan, state in zip(plans, states, strict=True):
        prefix = f"param.{plan.param_index}."
        for name, value in plan_metadata(plan).items():
            flat[prefix + name] = value
        for name, value in state.items():
            if name not in ARRAY_FIELDS:
                raise ValueError(
                    f"Unknown state field {name!r}; expected {ARRAY_FIELDS}"
                )
            flat[prefix + name] = np.asarray(
                _xp.to_numpy(value) if not isinstance(value, int) else value
            )
    return flat


def import_state(
    flat: Mapping[str, Any], plans: Sequence[CompressionPlan]
) -> list[dict[str, np.ndarray]]:
    """Per-parameter numpy states from the portable form, checked against ``plans``.

    Raises:
        ValueError: naming what differs: format or RNG version, number of parameters,
            or a parameter's shape, rank, axis, seed or distribution.
    """
    version = int(np.asarray(flat.get("flora.format_version", -1)))
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Unsupported Flora state format version {version}; this build reads {FORMAT_VERSION}"
        )
    num_params = int(np.asarray(flat["flora.num_params"]))
    if num_params != len(plans):
        raise ValueError(
            f"The state holds {num_params} parameters but the optimizer has {len(plans)}"
        )
    states = []
    for plan in plans:
        prefix = f"param.{plan.param_index}."
        if prefix + "rng_version" not in flat:
            raise ValueError(
                f"The state has no parameter with index {plan.param_index}"
            )
        _check_metadata(flat, prefix, plan)
        states.append(
            {
                name: np.asarray(flat[prefix + name])
                for name in ARRAY_FIELDS
                if prefix + name in flat
            }
        )
    return states


def _check_metadata(
    flat: Mapping[str, Any], prefix: str, plan: CompressionPlan
) -> None:
    expected = plan_metadata(plan)
    for name in (
        "rng_version",
        "shape",
        "rank",
        "axis",
        "seed",
        "distribution",
        "stream",
    ):
        got = np.asarray(flat[prefix + name])
        if got.shape != expected[name].shape or not np.array_equal(got, expected[name]):
            raise ValueError(
                f"Parameter {plan.param_index}: saved {name} {_describe(name, got)} "
                f"!= optimizer's {_describe(name, expected[name])}"
            )


def _describe(name: str, value: np.ndarray) -> str:
    if (
        name == "distribution"
        and value.ndim == 0
        and 0 <= int(value) < len(DISTRIBUTIONS)
    ):
        return repr(DISTRIBUTIONS[int(value)])
    if name == "shape":
        return str(tuple(int(v) for v in value))
    return str(value.tolist())


def save_state(flat: Mapping[str, Any], path: str) -> None:
    """Write the portable form to ``path``: ``.safetensors`` or ``.npz``."""
    arrays = {k: np.array(v, order="C") for k, v in flat.items()}  # keeps 0-d as 0-d
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    elif str(path).endswith(".npz"):
        np.savez(path, **arrays)  # type: ignore[arg-type]
    else:
        raise ValueError(f"Unknown state file type {path!r}; use .npz or .safetensors")


def load_state(path: str) -> dict[str, np.ndarray]:
    """Read the portable form written by :func:`save_state`."""
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if str(path).endswith(".npz"):
        with np.load(path) as data:
            return dict(data)
    raise ValueError(f"Unknown state file type {path!r}; use .npz or .safetensors")
