"""VeLoRA for JAX: a dense op that keeps rank-1 sub-token projections, and a Flax layer.

``velora_dense(x, w, b, v, group_size)`` computes ``y = x @ w + b`` with Flax's kernel
layout ``w: (in, out)``. Its matmul is a ``jax.custom_vjp`` whose residuals are only
``z = group(x) · v`` (one scalar per sub-token of size M), the kernel ``w`` (a
parameter, not an activation) and ``v``; backward rebuilds ``x̂ = ungroup(z vᵀ)`` and
returns ``∂w = x̂ᵀ ∂y`` (summed over all leading axes) and the exact ``∂x = ∂y wᵀ``.
The bias is added outside the custom rule, so ``∂b = Σ ∂y`` is ordinary autodiff.
The math is ``flora_core.velora``.

``VeLoRADense`` is a ``flax.linen`` module with ``nn.Dense``'s parameter names
(``kernel``, ``bias``) and ``v`` in the non-trainable collection ``"velora"``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flora_optax.velora import VeLoRADense
    >>> layer = VeLoRADense(features=4, group_size=2)
    >>> x = jnp.arange(16.0).reshape(2, 8)
    >>> variables = layer.init(jax.random.PRNGKey(0), x)
    >>> y, updates = layer.apply(variables, x, train=True, mutable=["velora"])
    >>> updates["velora"]["v"].shape
    (2,)

References:
    Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
    Projections", NeurIPS 2024 (Algorithm 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flora_core import velora

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _velora_matmul(x: Array, w: Array, v: Array, group_size: int) -> Array:
    return jnp.matmul(x, w)


def _velora_matmul_fwd(
    x: Array, w: Array, v: Array, group_size: int
) -> tuple[Array, tuple[Array, Array, Array]]:
    z = velora.compress(x, v, group_size, xp=jnp)
    return jnp.matmul(x, w), (z, w, v)


def _velora_matmul_bwd(
    group_size: int, residuals: tuple[Array, Array, Array], grad_y: Array
) -> tuple[Array, Array, Array]:
    z, w, v = residuals
    x_hat = velora.reconstruct(z, v, group_size, xp=jnp)
    rows = jnp.reshape(grad_y, (-1, grad_y.shape[-1]))
    grad_w = jnp.matmul(jnp.reshape(x_hat, (-1, x_hat.shape[-1])).T, rows)
    grad_x = jnp.matmul(grad_y, w.T).astype(z.dtype)
    return grad_x, grad_w.astype(w.dtype), jnp.zeros_like(v)  # v is not trained


_velora_matmul.defvjp(_velora_matmul_fwd, _velora_matmul_bwd)


def velora_dense(
    x: Array, w: Array, b: Array | None, v: Array, group_size: int
) -> Array:
    """``x @ w + b`` whose backward keeps only the rank-1 sub-token projections of x.

    Args:
        x: inputs ``(..., in)``.
        w: kernel ``(in, out)`` (Flax layout).
        b: bias ``(out,)`` or None.
        v: unit projection vector of ``group_size`` entries (not differentiated).
        group_size: the sub-token size M (must divide ``in``).

    Returns:
        ``y`` of shape ``(..., out)``.
    """
    velora.check_features(x.shape[-1], group_size)
    y = _velora_matmul(x, w, jax.lax.stop_gradient(v), int(group_size))
    return y if b is None else y + b


class VeLoRADense(nn.Module):
    """``nn.Dense`` with VeLoRA's compressed backward (a ``flax.linen`` module).

    ``v`` and a ``ready`` flag live in the ``"velora"`` collection. With
    ``train=True``, until ``v`` is ready the layer uses the mean sub-token of the
    current batch (``v_init="mean"``, the paper's default); pass
    ``mutable=["velora"]`` on the first training step to store it, after which it
    stays fixed. ``v_init="running"`` moves ``v`` on every mutable step with
    ``momentum``; ``v_init="random"`` draws it at ``init`` from FLORA-RNG (``seed``,
    ``stream``). With ``train=False`` the layer is a plain dense layer.

    Attributes:
        features: output size.
        group_size: the sub-token size M (must divide the input size).
        use_bias: whether to add a bias.
        v_init: ``"mean"``, ``"random"`` or ``"running"``.
        momentum: running-average β for ``v_init="running"``.
        seed, stream: FLORA-RNG inputs for ``v_init="random"``.
    """

    features: int
    group_size: int = 32
    use_bias: bool = True
    v_init: str = "mean"
    momentum: float = 0.99
    seed: int = 0
    stream: int = 0
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.v_init not in velora.INITS:
            raise ValueError(f"Invalid v_init: {self.v_init!r} ({velora.INITS})")
        m = velora.check_group_size(self.group_size)
        velora.check_features(x.shape[-1], m)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        bias = bias if self.use_bias else None
        random = self.v_init == "random"
        v = self.variable("velora", "v", self._initial_v, m)
        ready = self.variable("velora", "ready", lambda: jnp.asarray(random))
        if not train:
            return jnp.matmul(x, kernel) + (0.0 if bias is None else bias)
        if random:
            current = v.value
        else:
            current = jax.lax.cond(
                ready.value,
                self._next_v,
                lambda v_old, x_: velora.init_v_mean(x_, m, xp=jnp),
                v.value,
                jax.lax.stop_gradient(x).astype(v.value.dtype),
            )
            if self.is_mutable_collection("velora") and not self.is_initializing():
                v.value, ready.value = current, jnp.asarray(True)
        return velora_dense(x, kernel, bias, current, m)

    def _initial_v(self, group_size: int) -> Array:
        if self.v_init == "random":
            return velora.init_v_random(
                self.seed, group_size, stream=self.stream, xp=jnp
            )
        return jnp.zeros((group_size,), jnp.float32)

    def _next_v(self, v_old: Array, x: Array) -> Array:
        if self.v_init == "running":
            return velora.update_v_running(v_old, x, self.group_size, self.momentum)
        return v_old
