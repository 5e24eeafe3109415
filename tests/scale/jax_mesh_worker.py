"""FLORA Optax on a 2-D (data x model) mesh of 8 CPU devices; prints JSON.

Run in a fresh process (``XLA_FLAGS`` must be set before JAX starts):
``python jax_mesh_worker.py``. Steps ``flora_adam`` under ``jax.jit`` on params
placed with ``NamedSharding`` and states sharded like their parameters, the same
steps unsharded, and counts the collectives in the compiled update.
"""

from __future__ import annotations

import json
import os
import re

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import flora_optax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

STEPS = 4
SPECS = {
    "rows": P("model", None),  # 128 x 64, compressed along its (unsharded) columns
    "cols": P(None, "model"),  # 32 x 128, compressed along its (unsharded) rows
    "both": P("data", "model"),  # 64 x 96: the compressed axis is sharded too
    "bias": P("model"),
}
SHAPES = {"rows": (128, 64), "cols": (32, 128), "both": (64, 96), "bias": (128,)}


def state_spec(field: str, spec: P, plan, shape) -> P:
    """The PartitionSpec of a state leaf: its parameter's, along the kept axes."""
    if field == "nu" or (field == "mu" and not plan.compressed):
        return spec
    if field == "mu":  # (n, r) for axis 1, (r, m) for axis 0
        return P(spec[0], None) if plan.axis == 1 else P(None, spec[1])
    return P(spec[0]) if field == "nu_row" else P(spec[1])


def shard_state(state, params, mesh):
    """``device_put`` every state leaf sharded like its parameter."""
    names = sorted(params)  # tree-flatten order of a dict
    by_plan = dict(zip(names, state.spec.plans, strict=True))

    def place(field):
        tree = getattr(state, field)
        return {
            k: None
            if v is None
            else jax.device_put(
                v, NamedSharding(mesh, state_spec(field, SPECS[k], by_plan[k], v.shape))
            )
            for k, v in tree.items()
        }

    fields = {f: place(f) for f in ("mu", "nu", "nu_row", "nu_col")}
    return state._replace(count=jax.device_put(state.count, NamedSharding(mesh, P())),
                          **fields)  # fmt: skip


def collectives(hlo: str) -> dict[str, int]:
    ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
           "collective-permute")  # fmt: skip
    return {op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ops}


def params0():
    rng = np.random.default_rng(0)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def grads(t):
    rng = np.random.default_rng(100 + t)
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def run(tx, params, state, mesh=None):
    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return jax.tree.map(jnp.add, params, updates), state

    for t in range(STEPS):
        g = grads(t)
        if mesh is not None:
            g = {
                k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
                for k, v in g.items()
            }
        params, state = step(params, state, g)
    hlo = step.lower(params, state, g).compile().as_text()
    return params, state, hlo


def alone(key: str, kwargs: dict, mesh: Mesh) -> dict[str, int]:
    """The collectives of the compiled update of the single weight ``key``."""
    tx = flora_optax.flora_adam(1e-2, rank=8, kappa=2, **kwargs)
    sharding = NamedSharding(mesh, SPECS[key])
    params = {key: jax.device_put(params0()[key], sharding)}
    state = shard_state(tx.init(params), params, mesh)
    g = {key: jax.device_put(grads(0)[key], sharding)}
    return collectives(jax.jit(tx.update).lower(g, state, params).compile().as_text())


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    out = {}
    for name, kwargs in {"adam": {}, "adam_factored": {"factored": True}}.items():
        tx = flora_optax.flora_adam(1e-2, rank=8, kappa=2, **kwargs)
        ref_params, ref_state, _ = run(tx, params0(), tx.init(params0()))
        params = {
            k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
            for k, v in params0().items()
        }
        state = tx.init(params)  # flora_optax places every field like its parameter
        by_plan0 = dict(zip(sorted(SHAPES), state.spec.plans, strict=True))
        placed_by_init = {
            f: all(
                v.sharding.is_equivalent_to(
                    NamedSharding(mesh, state_spec(f, SPECS[k], by_plan0[k], v.shape)),
                    v.ndim,
                )
                for k, v in getattr(state, f).items()
                if v is not None
            )
            for f in ("mu", "nu", "nu_row", "nu_col")
        }
        assert all(placed_by_init.values()), f"init placement: {placed_by_init}"
        before = {k: str(v.sharding.spec) for k, v in state.mu.items()}
        params, state, hlo = run(tx, params, state, mesh)
        names = sorted(SHAPES)
        by_plan = dict(zip(names, state.spec.plans, strict=True))

        def kept(field, state=state, by_plan=by_plan):
            return all(
                v.sharding.is_equivalent_to(
                    NamedSharding(
                        mesh, state_spec(field, SPECS[k], by_plan[k], v.shape)
                    ),
                    v.ndim,
                )
                for k, v in getattr(state, field).items()
                if v is not None
            )

        out[name] = {
            "params_keep_sharding": all(
                v.sharding.is_equivalent_to(NamedSharding(mesh, SPECS[k]), v.ndim)
                for k, v in params.items()
            ),
            "states_keep_sharding": {
                f: kept(f) for f in ("mu", "nu", "nu_row", "nu_col")
            },
            "axes": {
                k: p.axis for k, p in zip(sorted(SHAPES), state.spec.plans, strict=True)
            },
            "param_specs": {k: str(v.sharding.spec) for k, v in params.items()},
            "mu_specs_before": before,
            "mu_specs": {k: str(v.sharding.spec) for k, v in state.mu.items()},
            "mu_local": {
                k: list(v.addressable_shards[0].data.shape) for k, v in state.mu.items()
            },
            "max_param_diff": max(
                float(jnp.max(jnp.abs(params[k] - ref_params[k]))) for k in SHAPES
            ),
            "max_mu_diff": max(
                float(jnp.max(jnp.abs(state.mu[k] - ref_state.mu[k]))) for k in SHAPES
            ),
            "collectives": collectives(hlo),
        }
        # one weight at a time: which ones make the update communicate
        out[name]["alone_collectives"] = {
            key: alone(key, kwargs, mesh) for key in ("rows", "cols", "both")
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
