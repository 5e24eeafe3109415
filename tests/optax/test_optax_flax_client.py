"""A real client: a flax.nnx MLP trains with flora_adam (compressed, rank="auto")."""

from __future__ import annotations

import flora_optax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.out = nnx.Linear(128, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.gelu(self.hidden(x)))


def test_flax_nnx_mlp_trains_with_flora_adam() -> None:
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.standard_normal((256, 64)), jnp.float32)
    teacher = jnp.asarray(rs.standard_normal((64, 1)) / 8, jnp.float32)
    y = jnp.sin(x @ teacher) + 0.5 * (x @ teacher) ** 2

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, flora_optax.flora_adam(3e-3, weight_decay=1e-4),
                              wrt=nnx.Param)  # fmt: skip

    @nnx.jit
    def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
        loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(60)]
    state = optimizer.opt_state
    kernel_mu = jax.tree.leaves(state.mu, is_leaf=lambda v: hasattr(v, "shape"))
    assert (16, 128) in {tuple(m.shape) for m in kernel_mu}  # 64 x 128: r = 64 // 4
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
