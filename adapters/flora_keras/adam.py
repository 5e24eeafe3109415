"""``FloraAdam``: Keras Adam / AdamW with FLORA's compressed first moment."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from flora_core import rules
from flora_core.validation import check_beta, check_nonnegative
from flora_keras import _docs
from flora_keras._base import FloraOptimizer


@keras.saving.register_keras_serializable(package="flora_keras")
@_docs.interpolate
class FloraAdam(FloraOptimizer):
    """Adam / AdamW whose first moment is a compressed random projection (FLORA).

    Each weight matrix keeps its momentum as a `k x r` projection instead of a full
    copy (FLORA Algorithm 2): with `t` the update count and `A_i` (`r x d`) the
    random projection of resample interval `i = t // kappa`,

        M <- beta_1 * M + (1 - beta_1) * compress(g, A_i)
        m = decompress(M, A_i)                  # the full-size direction
        g_hat = decompress(compress(g, A_i), A_i)   # second_moment="projected"
        v <- beta_2 * v + (1 - beta_2) * g_hat**2   # full, or factored rows x cols
        w <- w - lr * (sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)
                       + weight_decay * w)

    and at every `t = kappa, 2 kappa, ...` the momentum is transferred from
    `A_{i-1}` to `A_i` in `r x r` space (by `transfer`) and the projected `v` is
    levelled along the compressed axis (NOTE [second moment at a resample] in
    `flora_core.rules`). Weights that are not compressed (biases,
    small matrices) get exactly AdamW. `factored=True` replaces `v` by Adafactor's
    row and column statistics, which makes the whole state sublinear. The math is
    `flora_core.rules.flora_adam` (see its NOTE [projected second moment]: `v` of
    the raw gradient, `second_moment="gradient"`, makes `m / sqrt(v)` unbounded
    where a gradient element is small); this class only holds it in Keras
    variables.

    `epsilon` is Keras' ("epsilon hat" of Kingma and Ba, as in
    `keras.optimizers.Adam` and `AdamW`): it is added to `sqrt(v)` before the bias
    correction (the core's `AdamConfig(eps_before_bias_correction=True)`).
    flora_torch and flora_optax take torch's and optax's eps, added after the
    correction; the two conventions agree once `beta_2**t` is negligible
    (`t >> 1 / (1 - beta_2)`), and differ early only where `sqrt(v_hat)` is not much
    larger than `epsilon` (NOTE [epsilon placement] in `flora_core.rules`).

    Args:
        learning_rate: A float, a `keras.optimizers.schedules.LearningRateSchedule`
            or a callable with no arguments. Defaults to `0.001`.
        beta_1: float in `[0, 1)`, the decay of the (compressed) first moment.
        beta_2: float in `[0, 1)`, the decay of the second moment.
        epsilon: float >= 0 added to `sqrt(v)` before the bias correction (Keras'
            convention, see above). Defaults to `1e-7`.
        {{flora_args}}
        factored: bool, default False. Keep the second moment as Adafactor row and
            column means (of the `(shape[0], prod(shape[1:]))` view).
        second_moment: `"projected"` (default): `v` tracks the projected gradient
            the momentum sees; `"gradient"`: `v` tracks the raw gradient.
        weight_decay: `None` or a float >= 0: decoupled (AdamW) weight decay
            `lr * weight_decay * w`, applied inside the update (so it is gated
            with `accumulation_steps`). Honors `exclude_from_weight_decay`.
        {{base_optimizer_keyword_args}}

    Example:
        >>> import keras, numpy as np
        >>> from flora_keras import FloraAdam
        >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64),
        ...                           keras.layers.Dense(1)])
        >>> model.compile(optimizer=FloraAdam(learning_rate=1e-3), loss="mse")
        >>> _ = model.fit(np.ones((8, 64)), np.ones((8, 1)), verbose=0)
        >>> model.optimizer.plans[0].state_shape   # the 64 x 64 kernel's momentum
        (64, 16)

    References:
        Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient
        Compressors", ICML 2024. Kingma, Ba. "Adam", ICLR 2015. Loshchilov,
        Hutter. "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    _rule = staticmethod(rules.flora_adam)
    _init = staticmethod(rules.flora_adam_init)

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        *,
        rank: int | str | None = "auto",
        kappa: int = 1000,
        transfer: str = rules.DEFAULT_TRANSFER,
        seed: int = 0,
        factored: bool = False,
        second_moment: str = "projected",
        projection: str = "gaussian",
        accumulation_steps: int | None = None,
        weight_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        # Keras' names in the message; the config checks every field again.
        check_beta("beta_1", beta_1)
        check_beta("beta_2", beta_2)
        check_nonnegative("epsilon", epsilon)
        if weight_decay is not None:
            check_nonnegative("weight_decay", weight_decay)
        config = rules.AdamConfig(
            b1=beta_1,
            b2=beta_2,
            eps=epsilon,
            weight_decay=0.0 if weight_decay is None else weight_decay,
            kappa=kappa,
            factored=factored,
            second_moment=second_moment,
            transfer=transfer,
            eps_before_bias_correction=True,
        )
        super().__init__(
            learning_rate,
            rank=rank,
            kappa=kappa,
            transfer=transfer,
            seed=seed,
            projection=projection,
            accumulation_steps=accumulation_steps,
            weight_decay=weight_decay,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.factored = factored
        self.second_moment = second_moment
        self._config = config

    def _config_for(self, variable: Any) -> rules.AdamConfig:
        if self._config.weight_decay and not self._use_weight_decay(variable):
            return dataclasses.replace(self._config, weight_decay=0.0)
        return self._config

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "factored": self.factored,
                "second_moment": self.second_moment,
            }
        )
        return config
