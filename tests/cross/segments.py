"""Train a conformance problem over updates ``[t0, t1)`` with one adapter, starting
from given parameters and (optionally) a portable state, and export the state after.

Run as a subprocess, one per adapter configuration (Keras reads its backend at
import)::

    python tests/cross/segments.py ADAPTER JOBS.json OUT.npz

``ADAPTER`` is torch, optax, keras-tensorflow, keras-jax or keras-torch. Each job is
``{"key", "problem", "t0", "t1", "params": npz or null, "state": path or null}`` (the
state a ``flora_core.state_files`` file); the output holds ``{key}/step{t}_param{i}``
trajectories and ``{key}/state/...`` exports.
A job with ``"expect_error"`` imports the state into an optimizer of that rank and
records the error message instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "adapters")]


def _load(path: str | None) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    with np.load(path) as data:
        return dict(data)


def _load_state(path: str | None) -> dict[str, np.ndarray] | None:
    """A portable state file, read the bounded way every adapter reads one."""
    from flora_core import state_files

    return None if path is None else state_files.load_state(path)


def torch_segment(problem, params0, flat, t0, t1):
    import torch

    from conformance.adapters_torch import _optimizer

    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params0]
    optimizer = _optimizer(problem, params)
    if flat is not None:
        optimizer.import_state(flat)
    trajectory = []
    for micro_batches in problem.grads()[t0:t1]:
        for grads in micro_batches:
            sum(
                (p * torch.from_numpy(g)).sum()
                for p, g in zip(params, grads, strict=True)
            ).backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append([p.detach().numpy().copy() for p in params])
    return trajectory, optimizer.export_state()


def optax_segment(problem, params0, flat, t0, t1):
    import flora_optax
    import jax
    import jax.numpy as jnp
    import optax

    from conformance.adapters_optax import flora_transformation

    tx = flora_transformation(problem)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = [jnp.asarray(p) for p in params0]
    state = tx.init(params)
    if flat is not None:
        state = flora_optax.import_state(flat, state)
    trajectory = []
    for micro_batches in problem.grads()[t0:t1]:
        for grads in micro_batches:
            params, state = step(params, state, [jnp.asarray(g) for g in grads])
        trajectory.append([np.asarray(p) for p in params])
    return trajectory, flora_optax.export_state(state)


def keras_segment(problem, params0, flat, t0, t1):
    import flora_keras
    import keras

    from conformance.adapters_keras import flora_optimizer

    variables = [keras.Variable(p) for p in params0]
    optimizer = flora_optimizer(problem)
    optimizer.build(variables)
    if flat is not None:
        flora_keras.import_state(optimizer, flat)
    trajectory = []
    for micro_batches in problem.grads()[t0:t1]:
        for grads in micro_batches:  # the linear loss's gradient is exactly g
            tensors = [keras.ops.convert_to_tensor(g) for g in grads]
            optimizer.apply_gradients(zip(tensors, variables, strict=True))
        trajectory.append(
            [keras.ops.convert_to_numpy(v).astype(np.float32) for v in variables]
        )
    return trajectory, flora_keras.export_state(optimizer)


SEGMENTS = {"torch": torch_segment, "optax": optax_segment, "keras": keras_segment}


def main(adapter: str, jobs_path: str, out_path: str) -> None:
    from conformance.problems import PROBLEMS

    if adapter.startswith("keras-"):
        os.environ["KERAS_BACKEND"] = adapter.split("-", 1)[1]
    segment = SEGMENTS[adapter.split("-")[0]]
    out: dict[str, np.ndarray] = {}
    for job in json.loads(Path(jobs_path).read_text()):
        problem = PROBLEMS[job["problem"]]
        if "expect_error" in job:
            problem = problem.__class__(
                **{**problem.__dict__, "rank": job["expect_error"]}
            )
        params0 = _load(job["params"])
        params = problem.initial_params() if params0 is None else [
            params0[f"param{i}"] for i in range(len(problem.shapes))
        ]  # fmt: skip
        try:
            trajectory, state = segment(
                problem, params, _load_state(job["state"]), job["t0"], job["t1"]
            )
        except ValueError as error:
            if "expect_error" not in job:
                raise
            out[f"{job['key']}/error"] = np.array(str(error))
            continue
        if "expect_error" in job:
            out[f"{job['key']}/error"] = np.array("")
            continue
        for t, params_t in enumerate(trajectory, start=job["t0"]):
            for i, p in enumerate(params_t):
                out[f"{job['key']}/step{t}_param{i}"] = np.asarray(p, np.float32)
        for name, value in state.items():
            out[f"{job['key']}/state/{name}"] = np.asarray(value)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
