"""FloraAdafactor: Adafactor with FLORA's compressed momentum (torch)."""

from __future__ import annotations

from typing import Any

from flora_core import rules
from flora_torch._docs import interpolate
from flora_torch._optimizer import FloraOptimizer


@interpolate
class FloraAdafactor(FloraOptimizer):
    """``optax.adafactor(momentum=β)`` with FLORA's compressed momentum, for torch.

    The paper's setting. At update ``t`` (from 0) with gradient ``g``::

        ρ_t = 1 - (t + 1 - decay_offset) ** -decay_rate
        v   <- ρ_t v + (1 - ρ_t) (g² + eps)      (factored: row and column means)
        u   = g / sqrt(v̂)
        M   <- β M + (1 - β) compress(u, A_i);  u = decompress(M, A_i)
        u   <- u / max(1, rms(u) / clipping_threshold)
        u   <- lr u · max(rms(p), 1e-3)          (multiply_by_parameter_scale)
        p   <- p - (u + weight_decay_rate p)

    (``clip_after_momentum=False``: the momentum line moves after the scaling, as in
    ``optax.adafactor``.)

    ``A_i`` (``r x d``) is resampled every κ updates (``i = t // κ``) with the moment
    moved onto the new projection. Parameters that are not compressed get exactly
    Adafactor with momentum (in the chosen order; optax's weight decay, unlike
    ``transformers.Adafactor``'s, is not multiplied by the learning rate). The math
    is ``flora_core.rules.flora_adafactor``.

    Args:
        params: parameters or param groups (dicts; any argument below except
            ``accumulation_steps``, ``layerwise`` and ``max_grad_norm`` can be set
            per group), or ``model.named_parameters()`` (the names are kept in
            ``param_groups`` and ``state_dict()`` as ``param_names``).
        lr: learning rate; relative to the parameter's RMS when
            ``multiply_by_parameter_scale`` (a float or 1-element tensor).
        momentum: β of the (compressed) momentum; None disables momentum (then
            only accumulation is compressed).
        decay_rate: exponent of the second-moment decay ``ρ_t``.
        decay_offset: shifts ``t`` in ``ρ_t`` (for fine-tuning).
        min_dim_size_to_factor: factor ``v`` only when the second-largest axis is at
            least this long.
        clipping_threshold: block-RMS clipping of the scaled update (None: off).
        multiply_by_parameter_scale: scale the update by ``max(rms(p), 1e-3)``.
        weight_decay_rate: decoupled weight decay added to the update (None: off).
        eps: added to ``g²``.
        factored: use the factored second moment (Adafactor).
        clip_after_momentum: True (default; the official FLORA code's order): the
            momentum is taken of the RMS-scaled update ``g / sqrt(v̂)``, then
            clipped and scaled by ``lr`` and the parameter scale, so every update
            is bounded by ``clipping_threshold · lr · scale``. False:
            ``optax.adafactor``'s order (clip, scale, then momentum), where the
            decompressed momentum is unbounded (about ``sqrt(d/r)`` larger); with
            ``projection="identity"`` it reproduces ``optax.adafactor`` exactly.
            See NOTE [clip order] in ``flora_core.rules``.
    {flora_args}

    {state_doc}

    Example:
        >>> import torch
        >>> from flora_torch import FloraAdafactor
        >>> model = torch.nn.Linear(256, 128)
        >>> opt = FloraAdafactor(model.parameters(), lr=1e-2, rank=16)
        >>> model(torch.randn(4, 256)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> sorted(k for k, v in opt.state[model.weight].items() if hasattr(v, "shape"))
        ['mu', 'nu_col', 'nu_row']

    References:
        Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
        ICML 2024. Shazeer, Stern. "Adafactor: Adaptive Learning Rates with
        Sublinear Memory Cost", ICML 2018.
    """

    _kind = "adafactor"
    _init = staticmethod(rules.flora_adafactor_init)
    _rule = staticmethod(rules.flora_adafactor)

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-2,
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
        transfer: str = rules.DEFAULT_TRANSFER,
        rank: int | str | None = "auto",
        kappa: int = 1000,
        seed: int = 0,
        projection: str = "gaussian",
        axis: int | None = None,
        accumulation_steps: int = 1,
        layerwise: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, decay_rate=decay_rate, decay_offset=decay_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            weight_decay_rate=weight_decay_rate, eps=eps, factored=factored,
            clip_after_momentum=clip_after_momentum, transfer=transfer, rank=rank,
            kappa=kappa, seed=seed, projection=projection, axis=axis,
        )  # fmt: skip
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps,
            layerwise=layerwise, max_grad_norm=max_grad_norm,
        )  # fmt: skip

    def _config(self, group: dict[str, Any]) -> rules.AdafactorConfig:
        return rules.AdafactorConfig(
            momentum=group["momentum"],
            decay_rate=group["decay_rate"],
            decay_offset=group["decay_offset"],
            min_dim_size_to_factor=group["min_dim_size_to_factor"],
            clipping_threshold=group["clipping_threshold"],
            multiply_by_parameter_scale=group["multiply_by_parameter_scale"],
            weight_decay_rate=group["weight_decay_rate"],
            eps=group["eps"],
            factored=group["factored"],
            kappa=group["kappa"],
            transfer=group["transfer"],
            clip_after_momentum=group["clip_after_momentum"],
        )
