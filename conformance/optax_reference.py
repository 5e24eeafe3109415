"""optax's Adafactor pieces in the official FLORA code's order (a reference)."""

from __future__ import annotations

from typing import Any

from flora_core import rules


def adafactor_official_order(lr: float, config: rules.AdafactorConfig) -> Any:
    """``optax.adafactor``'s pieces with the momentum EMA right after the RMS scaling,
    before clipping, the learning rate and the parameter scale: what
    ``clip_after_momentum=True`` computes in identity mode (NOTE [clip order])."""
    import optax

    pieces = [
        optax.scale_by_factored_rms(
            config.factored, config.decay_rate, config.decay_offset,
            config.min_dim_size_to_factor, config.eps,
        ),
        optax.ema(config.momentum, debias=False),
    ]  # fmt: skip
    if config.clipping_threshold is not None:
        pieces.append(optax.clip_by_block_rms(config.clipping_threshold))
    pieces.append(optax.scale_by_learning_rate(lr, flip_sign=False))
    if config.multiply_by_parameter_scale:
        pieces.append(optax.scale_by_param_block_rms())
    if config.weight_decay_rate is not None:
        pieces.append(optax.add_decayed_weights(config.weight_decay_rate))
    return optax.chain(*pieces, optax.scale(-1.0))
