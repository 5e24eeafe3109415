"""VeLoRA for Keras 3: a dense layer that keeps rank-1 sub-token projections.

``VeLoRADense`` is ``keras.layers.Dense`` (kernel ``(in, units)``) whose matmul, in
training, saves for backward only ``z = group(x) · v`` (one scalar per sub-token of
size M), the kernel and ``v``; backward rebuilds ``x̂ = ungroup(z vᵀ)`` and uses
``∂kernel = x̂ᵀ ∂y`` (summed over all leading axes) and the exact ``∂x = ∂y kernelᵀ``.
The bias and activation keep ordinary autodiff. The math is ``flora_core.velora``.

The gradient rule uses each backend's own mechanism: ``keras.ops.custom_gradient``
on TensorFlow and JAX, and on torch the ``torch.autograd.Function`` of
``flora_torch.velora`` (Keras's torch ``custom_gradient`` saves every input, x
included, which would defeat the purpose).

Example:
    >>> import keras
    >>> from flora_keras.velora import VeLoRADense
    >>> model = keras.Sequential([keras.Input((16,)), VeLoRADense(4, group_size=8)])
    >>> model.layers[0].v.shape
    (8,)

References:
    Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
    Projections", NeurIPS 2024 (Algorithm 1).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from flora_core import velora


def velora_matmul(x: Any, kernel: Any, v: Any, group_size: int) -> Any:
    """``x @ kernel`` (kernel ``(in, out)``) with VeLoRA's compressed backward.

    Args:
        x: inputs ``(..., in)``.
        kernel: ``(in, out)``.
        v: unit projection vector of ``group_size`` entries (not differentiated).
        group_size: the sub-token size M (must divide ``in``).

    Returns:
        ``(..., out)``.
    """
    velora.check_features(x.shape[-1], group_size)
    v = ops.stop_gradient(ops.convert_to_tensor(v))
    if keras.backend.backend() == "torch":
        from flora_torch.velora import velora_linear

        return velora_linear(x, ops.transpose(kernel), None, v, group_size)
    return _custom_gradient_matmul(x, ops.convert_to_tensor(kernel), v, group_size)


def _custom_gradient_matmul(x: Any, kernel: Any, v: Any, group_size: int) -> Any:
    @ops.custom_gradient
    def matmul(x: Any, kernel: Any) -> Any:
        z = velora.compress(ops.reshape(x, (-1, x.shape[-1])), v, group_size)

        def grad(*args: Any, upstream: Any = None) -> tuple[Any, Any]:
            if upstream is None:  # JAX passes it positionally, TensorFlow too
                (upstream,) = args
            x_hat = velora.reconstruct(z, v, group_size)
            rows = ops.reshape(upstream, (-1, upstream.shape[-1]))
            grad_kernel = ops.matmul(ops.transpose(x_hat), rows)
            return ops.matmul(upstream, ops.transpose(kernel)), grad_kernel

        return ops.matmul(x, kernel), grad

    return matmul(x, kernel)


@keras.saving.register_keras_serializable(package="flora_keras")
class VeLoRADense(keras.layers.Layer):
    """A dense layer whose backward keeps rank-1 sub-token projections of its input.

    ``v`` is a non-trainable weight. With ``training=True`` it is set from the first
    batch's mean sub-token (``v_init="mean"``, the paper's default) and then fixed;
    ``"running"`` moves it every training batch with ``momentum``; ``"random"`` draws
    it once from FLORA-RNG (``seed``, ``stream``). Outside training the layer is a
    plain dense layer.

    Args:
        units: output size.
        group_size: the sub-token size M (must divide the input size).
        activation: as in ``keras.layers.Dense``.
        use_bias: whether to add a bias.
        v_init: ``"mean"``, ``"random"`` or ``"running"``.
        momentum: running-average β for ``v_init="running"``.
        seed, stream: FLORA-RNG inputs for ``v_init="random"``.
        kernel_initializer, bias_initializer: as in ``keras.layers.Dense``.
    """

    def __init__(
        self,
        units: int,
        group_size: int = 32,
        activation: Any = None,
        use_bias: bool = True,
        v_init: str = "mean",
        momentum: float = 0.99,
        seed: int = 0,
        stream: int = 0,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"Invalid units: {units!r} (expected an int >= 1)")
        if v_init not in velora.INITS:
            raise ValueError(f"Invalid v_init: {v_init!r} ({velora.INITS})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"Invalid momentum: {momentum!r} (expected [0, 1])")
        self.units = units
        self.group_size = velora.check_group_size(group_size)
        self.activation = keras.activations.get(activation)
        self.use_bias, self.v_init = use_bias, v_init
        self.momentum, self.seed, self.stream = float(momentum), seed, stream
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape: Any) -> None:
        features = input_shape[-1]
        velora.check_features(features, self.group_size)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(features, self.units),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer
            )
        random = self.v_init == "random"
        first_v: Any = "zeros"
        if random:
            host = velora.init_v_random(self.seed, self.group_size, stream=self.stream)
            first_v = keras.initializers.Constant(host.tolist())
        self.v = self.add_weight(
            name="v", shape=(self.group_size,), initializer=first_v, trainable=False
        )
        self.v_ready = self.add_weight(
            name="v_ready",
            shape=(),
            initializer="ones" if random else "zeros",
            trainable=False,
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if training:
            y = velora_matmul(
                inputs, self.kernel, self._current_v(inputs), self.group_size
            )
        else:
            y = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return self.activation(y)

    def _current_v(self, inputs: Any) -> Any:
        if self.v_init == "random":
            return ops.convert_to_tensor(self.v)
        x = ops.stop_gradient(ops.cast(inputs, self.v.dtype))
        x = ops.reshape(x, (-1, x.shape[-1]))
        old = ops.convert_to_tensor(self.v)
        m = self.group_size

        def follow() -> Any:
            if self.v_init == "running":
                return velora.update_v_running(old, x, m, self.momentum)
            return old

        v = ops.cond(self.v_ready > 0.5, follow, lambda: velora.init_v_mean(x, m))
        self.v.assign(v)
        self.v_ready.assign(ops.ones((), self.v_ready.dtype))
        return v

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            units=self.units,
            group_size=self.group_size,
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            v_init=self.v_init,
            momentum=self.momentum,
            seed=self.seed,
            stream=self.stream,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config
