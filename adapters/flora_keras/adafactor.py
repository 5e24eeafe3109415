"""``FloraAdafactor``: optax's Adafactor with momentum, the momentum compressed."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from flora_core import rules
from flora_keras import _docs
from flora_keras._base import FloraOptimizer


@keras.saving.register_keras_serializable(package="flora_keras")
@_docs.interpolate
class FloraAdafactor(FloraOptimizer):
    """Adafactor with momentum (the FLORA paper's setting), momentum compressed.

    The pieces of `optax.adafactor(..., momentum=momentum)` with the momentum EMA
    replaced by FLORA's compressed one (Algorithm 2), in the official FLORA code's
    order, per weight `w` with gradient `g` at update `t` (counted from 1):

        decay = 1 - (t - decay_offset) ** -decay_rate
        v <- decay * v + (1 - decay) * (g**2 + eps)   # factored: row and column
        u = g / sqrt(v)
        M <- momentum * M + (1 - momentum) * compress(u, A_i);  u = decompress(M)
        u <- u / max(1, rms(u) / clipping_threshold)
        u <- lr * u * max(rms(w), 1e-3)               # multiply_by_parameter_scale
        w <- w - u - weight_decay_rate * w

    (`clip_after_momentum=False`: the momentum line moves after the scaling, which
    is exactly `optax.adafactor`'s order.)

    with the projection `A_i` redrawn every `kappa` updates and `M` transferred.
    With `factored=True` (the default) the second moment of a matrix is its row
    and column means, so the whole state is sublinear in the weight size — unlike
    `keras.optimizers.Adafactor`, which also keeps a full-size velocity and has
    no momentum. The math is `flora_core.rules.flora_adafactor`.

    Args:
        learning_rate: A float, a `keras.optimizers.schedules.LearningRateSchedule`
            or a callable with no arguments. Defaults to `0.001`.
        momentum: `None` or a float in `[0, 1)`, default 0.9: the decay of the
            (compressed) momentum. `None` keeps no momentum (nothing to compress).
        decay_rate: float >= 0, default 0.8: the second-moment decay exponent.
        decay_offset: int >= 0, default 0: shifts `t` in the decay schedule.
        min_dim_size_to_factor: int >= 1, default 128: factor the second moment
            only when the second-largest axis is at least this big.
        clipping_threshold: `None` or a float > 0, default 1.0: block-RMS clipping
            of the scaled update.
        multiply_by_parameter_scale: bool, default True: scale the step by
            `max(rms(w), 1e-3)` (relative steps).
        weight_decay_rate: `None` or a float >= 0: decoupled decay added after the
            learning rate, as in optax (not multiplied by it). Keras' base
            `weight_decay` is not accepted. Honors `exclude_from_weight_decay`.
        eps: float >= 0, default 1e-30, added to `g**2`.
        factored: bool, default True: factor the second moment of matrices.
        clip_after_momentum: bool, default True (the official FLORA code's
            order): the momentum is taken right after the RMS scaling, then
            clipped and scaled, so every update is bounded by the threshold.
            False: optax.adafactor's order (clip and scale, then momentum), where
            the decompressed momentum is unbounded (about `sqrt(d/r)` larger); with
            `projection="identity"` it equals `optax.adafactor`.
        {{flora_args}}
        {{base_optimizer_keyword_args}}

    Example:
        >>> import keras, numpy as np
        >>> from flora_keras import FloraAdafactor
        >>> model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256),
        ...                           keras.layers.Dense(1)])
        >>> model.compile(optimizer=FloraAdafactor(learning_rate=1e-2), loss="mse")
        >>> _ = model.fit(np.ones((8, 256)), np.ones((8, 1)), verbose=0)
        >>> model.optimizer.plans[0].state_shape   # the 256 x 256 kernel's momentum
        (256, 64)

    References:
        Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient
        Compressors", ICML 2024. Shazeer, Stern. "Adafactor: Adaptive Learning
        Rates with Sublinear Memory Cost", ICML 2018.
    """

    _rule = staticmethod(rules.flora_adafactor)
    _init = staticmethod(rules.flora_adafactor_init)

    def __init__(
        self,
        learning_rate: Any = 0.001,
        *,
        momentum: float | None = 0.9,
        decay_rate: float = 0.8,
        decay_offset: int = 0,
        min_dim_size_to_factor: int = 128,
        clipping_threshold: float | None = 1.0,
        multiply_by_parameter_scale: bool = True,
        weight_decay_rate: float | None = None,
        eps: float = 1e-30,
        factored: bool = True,
        clip_after_momentum: bool = True,
        rank: int | str | None = "auto",
        kappa: int = 1000,
        transfer: str = rules.DEFAULT_TRANSFER,
        seed: int = 0,
        projection: str = "gaussian",
        accumulation_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("weight_decay", None) is not None:
            raise ValueError(
                "FloraAdafactor takes weight_decay_rate (optax.adafactor's decoupled "
                "decay, not scaled by the learning rate), not weight_decay"
            )
        config = rules.AdafactorConfig(
            momentum=momentum,
            decay_rate=decay_rate,
            decay_offset=decay_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            weight_decay_rate=weight_decay_rate,
            eps=eps,
            factored=factored,
            kappa=kappa,
            transfer=transfer,
            clip_after_momentum=clip_after_momentum,
        )
        super().__init__(
            learning_rate,
            rank=rank,
            kappa=kappa,
            transfer=transfer,
            seed=seed,
            projection=projection,
            accumulation_steps=accumulation_steps,
            **kwargs,
        )
        self.momentum = momentum
        self.decay_rate = decay_rate
        self.decay_offset = decay_offset
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.clipping_threshold = clipping_threshold
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.weight_decay_rate = weight_decay_rate
        self.eps = eps
        self.factored = factored
        self.clip_after_momentum = clip_after_momentum
        self._config = config

    def _config_for(self, variable: Any) -> rules.AdafactorConfig:
        if self._config.weight_decay_rate and not self._use_weight_decay(variable):
            return dataclasses.replace(self._config, weight_decay_rate=None)
        return self._config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "decay_rate": self.decay_rate,
                "decay_offset": self.decay_offset,
                "min_dim_size_to_factor": self.min_dim_size_to_factor,
                "clipping_threshold": self.clipping_threshold,
                "multiply_by_parameter_scale": self.multiply_by_parameter_scale,
                "weight_decay_rate": self.weight_decay_rate,
                "eps": self.eps,
                "factored": self.factored,
                "clip_after_momentum": self.clip_after_momentum,
            }
        )
        return config
