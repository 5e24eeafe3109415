"""Run by ``test_optax_sharding.py`` in a subprocess with 8 host CPU devices.

Params under ``NamedSharding`` on a 4 x 2 mesh, sharded along the kept axis, the
compressed axis, both, or replicated. For each transformation the jitted update must
return updates and params with the params' shardings, and equal the unsharded run
(rtol 1e-4, atol 1e-5 as the conformance registry: sharded matmuls sum in
another order, and FloraAdam amplifies rounding, see NOTE [conditioning]). Prints one ``OK`` line
per transformation; any failure raises.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flora_optax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

SHAPES = {
    "rows": (64, 48),
    "cols": (48, 64),
    "both": (96, 80),
    "bias": (48,),
    "scale": (),
}
SPECS = {
    "rows": P("data", None),  # kept axis sharded: compress/decompress are local
    "cols": P(None, "model"),  # 48 x 64 compresses its rows: kept axis sharded
    "both": P("data", "model"),  # the compressed axis (80) is sharded: a reduction
    "bias": P("model"),
    "scale": P(),
}
RANK = 8
TRANSFORMATIONS = {
    "flora_adam": lambda: flora_optax.flora_adam(1e-2, rank=RANK, kappa=2, weight_decay=0.1),
    "flora_multi_steps": lambda: flora_optax.flora_multi_steps(
        flora_optax.flora_adafactor(1e-2, rank=RANK, kappa=2, min_dim_size_to_factor=16),
        2, rank=RANK),
}  # fmt: skip


def bounded(rs: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (
        rs.choice([-1.0, 1.0], size=shape) * rs.uniform(0.5, 1.5, size=shape)
    ).astype(np.float32)


def run(tx: optax.GradientTransformation, params: dict, grads: list) -> tuple:
    step = jax.jit(lambda g, s, p: _step(tx, g, s, p))
    state = tx.init(params)
    for g in grads:
        params, state, updates = step(g, state, params)
    return params, updates


def _step(tx: optax.GradientTransformation, g: dict, s: object, p: dict) -> tuple:
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, updates


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
    rs = np.random.default_rng(0)
    params = {k: rs.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: bounded(rs, s) for k, s in SHAPES.items()} for _ in range(4)]
    place = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}  # noqa: E731
    for name, make in TRANSFORMATIONS.items():
        want_params, want_updates = run(make(), params, grads)
        got_params, got_updates = run(make(), place(params), [place(g) for g in grads])
        for k, sharding in shardings.items():
            for got in (got_params[k], got_updates[k]):
                assert got.sharding.is_equivalent_to(sharding, got.ndim), (
                    name,
                    k,
                    got.sharding,
                )
            np.testing.assert_allclose(
                got_params[k], want_params[k], rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                got_updates[k], want_updates[k], rtol=1e-4, atol=1e-5
            )
        print("OK", name)


if __name__ == "__main__":
    main()
