"""The adapter registry: every adapter plugs in here and the generic suite runs it.

An adapter registers a :class:`AdapterEntry` whose ``run(problem)`` trains the
conformance :class:`~conformance.problems.Problem` with the adapter's own optimizer
class (its own backward pass, accumulation and state handling) and returns the
parameters after each update as numpy arrays. The suite compares that trajectory with
the committed numpy oracle (``conformance/vectors``) and, in identity mode, with the
host framework's own Adam / Adafactor.

Registration lives next to the adapter's tests (``conformance/adapters_*.py``) and is
imported by ``conformance/test_adapters.py`` only when the adapter's framework is
importable in the running session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from conformance.problems import Problem

Trajectory = list[list[np.ndarray]]


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter the generic suite runs.

    Attributes:
        name: e.g. "torch", "optax", "keras".
        run: trains a problem, returns the parameters after each update.
        run_reference: the host's own optimizer on an identity-mode problem (torch
            Adam/AdamW, optax.adam/adafactor, keras Adam...), or None.
        supports: predicate saying whether the adapter can run a problem (e.g. an
            adapter without compressed accumulation returns False for tau > 1).
        rtol, atol: float tolerance of the comparison with the oracle.
        solves: the problem the adapter's ``run`` actually solves, where a host
            convention fixes a setting (Keras' epsilon: FloraAdam with
            ``eps_before_bias_correction=True`` whatever the problem says).
    """

    name: str
    run: Callable[[Problem], Trajectory]
    run_reference: Callable[[Problem], Trajectory] | None = None
    supports: Callable[[Problem], bool] = lambda problem: True
    rtol: float = 1e-4
    atol: float = 1e-5
    solves: Callable[[Problem], Problem] = lambda problem: problem


ADAPTERS: dict[str, AdapterEntry] = {}


def register(entry: AdapterEntry) -> AdapterEntry:
    if entry.name in ADAPTERS:
        raise ValueError(f"Adapter {entry.name!r} is already registered")
    ADAPTERS[entry.name] = entry
    return entry


_RUNS: dict[tuple[str, str], Trajectory] = {}


def run_once(name: str, problem: Problem) -> Trajectory:
    """``ADAPTERS[name].run(problem)``, computed once per process: the checks against
    the committed vectors (``test_adapters``) and against the reference
    (``test_reference``) share it."""
    key = (name, repr(problem))
    if key not in _RUNS:
        _RUNS[key] = ADAPTERS[name].run(problem)
    return _RUNS[key]
