"""FloraAdam: AdamW whose first moment is FLORA's compressed momentum (torch)."""

from __future__ import annotations

from typing import Any

from flora_core import rules
from flora_core.validation import check_beta
from flora_torch._docs import interpolate
from flora_torch._optimizer import FloraOptimizer


@interpolate
class FloraAdam(FloraOptimizer):
    """AdamW with FLORA's compressed first moment, as a ``torch.optim.Optimizer``.

    For a compressed parameter (projection ``A_i`` of shape ``r x d``, resampled
    every κ updates, ``i = t // κ``) with gradient ``g`` at update ``t``::

        M <- β1 M + (1 - β1) compress(g, A_i)        (moved A_{i-1} -> A_i first)
        ĝ = decompress(compress(g, A_i), A_i)         (second_moment="projected")
        v <- β2 v + (1 - β2) ĝ²                       (factored: Adafactor's row/col)
        p <- p - lr (decompress(M, A_i) / (1 - β1^t) / (sqrt(v / (1 - β2^t)) + eps)
                     + weight_decay p)

    At a resample the moment moves by ``transfer`` and the projected ``v`` is
    levelled along the compressed axis (NOTE [second moment at a resample] in
    ``flora_core.rules``). Parameters that are not compressed get exactly AdamW
    (decoupled weight decay);
    ``projection="identity"`` gives AdamW for every parameter. The math is
    ``flora_core.rules.flora_adam``.

    Args:
        params: parameters or param groups (dicts; any argument below except
            ``accumulation_steps``, ``layerwise`` and ``max_grad_norm`` can be set
            per group), or ``model.named_parameters()`` (the names are kept in
            ``param_groups`` and ``state_dict()`` as ``param_names``).
        lr: learning rate (a float or a 1-element tensor; LR schedulers work).
        betas: ``(β1, β2)``; β1 is the compressed momentum's decay.
        eps: added to ``sqrt(v̂)``.
        weight_decay: decoupled weight decay, as ``torch.optim.AdamW``.
        factored: keep ``v`` factored into row and column means (Adafactor), so the
            whole state is sublinear in the parameter size.
        second_moment: ``"projected"`` (default): ``v`` tracks the projected
            gradient ``ĝ`` that the moment sees, so ``|m / sqrt(v)|`` stays O(1) (one
            more ``k x r x d`` matmul per step); ``"gradient"``: ``v`` tracks the raw
            ``g²`` (cheaper, but ``m / sqrt(v)`` is unbounded where a gradient
            element is near zero). Both equal AdamW when nothing is compressed.
    {flora_args}

    {state_doc}

    Example:
        >>> import torch
        >>> from flora_torch import FloraAdam
        >>> model = torch.nn.Linear(64, 128)  # weight 128 x 64
        >>> opt = FloraAdam(model.parameters(), lr=1e-3, rank=8)
        >>> model(torch.randn(4, 64)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> tuple(opt.state[model.weight]["mu"].shape)  # 128 x 8, not 128 x 64
        (128, 8)

    References:
        Hao, Cao, Mou. "Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
        ICML 2024 (Algorithms 1 and 2). Loshchilov, Hutter. "Decoupled Weight Decay
        Regularization", ICLR 2019.
    """

    _kind = "adam"
    _init = staticmethod(rules.flora_adam_init)
    _rule = staticmethod(rules.flora_adam)

    def __init__(
        self,
        params: Any,
        lr: Any = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int | str | None = "auto",
        kappa: int = 1000,
        seed: int = 0,
        factored: bool = False,
        second_moment: str = "projected",
        transfer: str = rules.DEFAULT_TRANSFER,
        projection: str = "gaussian",
        axis: int | None = None,
        accumulation_steps: int = 1,
        layerwise: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
            kappa=kappa, seed=seed, factored=factored, second_moment=second_moment,
            transfer=transfer, projection=projection, axis=axis,
        )  # fmt: skip
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps,
            layerwise=layerwise, max_grad_norm=max_grad_norm,
        )  # fmt: skip

    def _config(self, group: dict[str, Any]) -> rules.AdamConfig:
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)")
        check_beta("beta1", betas[0])
        check_beta("beta2", betas[1])
        return rules.AdamConfig(
            b1=float(betas[0]),
            b2=float(betas[1]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            kappa=group["kappa"],
            factored=group["factored"],
            second_moment=group["second_moment"],
            transfer=group["transfer"],
        )
