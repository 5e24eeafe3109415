"""FloraAdam and FloraAdafactor as Optax optimizers (``optax.adamw`` / ``adafactor``)."""

from __future__ import annotations

from typing import Any

import optax

from flora_core import rules
from flora_optax import _common, _docs, _rule


@_docs.fill
def flora_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
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
    param_indices: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """FloraAdam: AdamW whose first moment is FLORA's compressed momentum.

    Per leaf ``g`` at step ``t`` (from 0), with ``A_i`` the projection of resample
    index ``i = t // kappa`` (Algorithm 2 of the paper)::

        M <- b1 M + (1 - b1) compress(g, A_i)     # k x r instead of n x m
        m = decompress(M, A_i)
        h = decompress(compress(g, A_i), A_i)      # second_moment="projected"
        v <- b2 v + (1 - b2) h^2                   # factored=True: Adafactor's rows/cols
        u = -lr (m / (1 - b1^(t+1)) / (sqrt(v / (1 - b2^(t+1))) + eps) + wd * p)

    At ``t % kappa == 0`` (``t > 0``) ``M`` is first transferred from ``A_{i-1}``
    to ``A_i``. Leaves that are not compressed get exact AdamW; with
    ``projection="identity"`` the whole thing equals ``optax.adamw``.

    {streams}

    {static_note}

    {inject_adam}

    Args:
        learning_rate: a float, a scalar array or a schedule ``count -> lr``.
        b1: decay of the (compressed) first moment.
        b2: decay of the second moment.
        eps: added to the root of the second moment.
        weight_decay: decoupled weight decay (AdamW); needs ``params`` in update.
        {flora_args}
        {kappa_arg}
        factored: keep the second moment as Adafactor's row/column factors
            (sublinear state) instead of in full.
        second_moment: ``"projected"`` (default): ``v`` tracks the projected
            gradient ``h``, the stream the momentum sees, so ``|m / sqrt(v)|`` stays
            O(1) (one more ``k x r x d`` matmul per step); ``"gradient"``: ``v``
            tracks the raw gradient ``g`` (see NOTE [projected second moment] in
            ``flora_core.rules``).
        mask: which leaves get weight decay: a pytree of bools shaped like the
            params, or a callable ``params -> pytree`` (as in ``optax.adamw``).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`FloraAdamState`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, flora_optax
        >>> params = {"w": jnp.ones((64, 48)), "b": jnp.zeros(48)}
        >>> tx = flora_adam(1e-3, rank=8)
        >>> state = tx.init(params)
        >>> state.mu["w"].shape  # 64 x 48 compressed along its 48 columns
        (64, 8)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = jax.jit(tx.update)(grads, state, params)
        >>> params = optax.apply_updates(params, updates)

    References:
        {references}
    """
    _common.check_learning_rate(learning_rate)
    hyper = dict(
        b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, kappa=kappa, factored=factored,
        second_moment=second_moment, transfer=transfer,
    )  # fmt: skip
    structure = _common.Structure.checked(rank, seed, projection, axis, param_indices)
    return _rule.transformation(_rule.ADAM, learning_rate, hyper, structure, mask)


@_docs.fill
def flora_adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = 0.9,
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    *,
    clip_after_momentum: bool = True,
    transfer: str = rules.DEFAULT_TRANSFER,
    rank: int | str | None = "auto",
    kappa: int = 1000,
    seed: int = 0,
    projection: str = "gaussian",
    axis: int | None = None,
    param_indices: Any = None,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """FloraAdafactor: ``optax.adafactor(momentum=...)`` with FLORA's compressed EMA.

    The pieces of ``optax.adafactor`` (the paper's setting): factored RMS scaling
    (``decay = 1 - (t + 1 - decay_offset)^-decay_rate``), the momentum EMA
    (FLORA's compressed momentum, Algorithm 2, resampled every ``kappa`` updates
    with transfer), block-RMS clipping, the learning rate, optional parameter
    scaling, weight decay and the sign flip. That is the official FLORA code's order;
    ``clip_after_momentum=False`` moves the EMA after the parameter scaling, as in
    ``optax.adafactor``. ``momentum=None`` keeps no first moment (plain Adafactor);
    with ``projection="identity"`` and ``clip_after_momentum=False`` this equals
    ``optax.adafactor(momentum=momentum)``.

    {streams}

    {static_note}

    {inject_adafactor}

    Args:
        learning_rate: a float, a scalar array, a schedule ``count -> lr``, or None
            (no scaling, as in ``optax.adafactor``).
        min_dim_size_to_factor: factor the second moment only when the two largest
            axes are at least this long.
        decay_rate: exponent of the second-moment decay schedule.
        decay_offset: step offset of that schedule (fine-tuning).
        multiply_by_parameter_scale: scale the step by the parameter's RMS.
        clipping_threshold: block-RMS clipping threshold, or None.
        momentum: decay of the compressed momentum, or None for none.
        weight_decay_rate: decoupled weight decay added after the momentum, or None.
        eps: regularizer of the squared gradient.
        factored: factor the second moment of matrices.
        clip_after_momentum: True (default; the official FLORA code's order): the
            momentum is taken right after the RMS scaling, then clipped and scaled,
            so every update is bounded by the clipping threshold. False:
            ``optax.adafactor``'s order (clip and scale, then momentum), where the
            decompressed momentum is unbounded (about ``sqrt(d/r)`` larger); with
            ``projection="identity"`` it equals ``optax.adafactor``. See NOTE
            [clip order] in ``flora_core.rules``.
        {flora_args}
        {kappa_arg}
        weight_decay_mask: which leaves get weight decay (pytree of bools or callable).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`FloraAdafactorState`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, flora_optax
        >>> params = {"w": jnp.ones((256, 192))}
        >>> tx = flora_adafactor(1e-2, rank=16)
        >>> state = tx.init(params)
        >>> state.mu["w"].shape, state.nu_row["w"].shape, state.nu_col["w"].shape
        ((256, 16), (192,), (256,))
        >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)

    References:
        {references}
        Shazeer, Stern. "Adafactor: Adaptive Learning Rates with Sublinear Memory
        Cost", ICML 2018.
    """
    _common.check_learning_rate(learning_rate, optional=True)
    hyper = dict(
        momentum=momentum, decay_rate=decay_rate, decay_offset=decay_offset,
        min_dim_size_to_factor=min_dim_size_to_factor,
        clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        weight_decay_rate=weight_decay_rate, eps=eps, factored=factored, kappa=kappa,
        transfer=transfer, clip_after_momentum=clip_after_momentum,
    )  # fmt: skip
    structure = _common.Structure.checked(rank, seed, projection, axis, param_indices)
    return _rule.transformation(
        _rule.ADAFACTOR, learning_rate, hyper, structure, weight_decay_mask
    )
