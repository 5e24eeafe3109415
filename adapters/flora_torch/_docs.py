"""Hyper-parameter documentation written once and interpolated into each optimizer."""

from __future__ import annotations

FLORA_ARGS = """\
        rank: ``"auto"`` (default: ``r = min(256, d // 4)`` for a compressed axis of
            size ``d >= 32``), an int ``r`` (compress when ``d > r``) or None (never
            compress: the group gets the exact base optimizer). 0-D and 1-D
            parameters are never compressed. Decided by ``flora_core.policy.plan``.
        kappa: resample the momentum projection every ``kappa`` updates (κ), moving
            the compressed moment onto the new projection in ``r x r`` space.
        transfer: how the moment moves onto a new projection:
            ``"least_squares"`` (default: scaled by ``1/γ``, ``γ = 1 + (d+1)/r``,
            the least expected error, stable at any κ), ``"norm"`` (scaled by
            ``1/sqrt(γ)``: keeps the moment's norm) or ``"paper"`` (Algorithm 2 as
            printed: unscaled, so each transfer multiplies the moment's norm by
            about ``sqrt(d/r)``; stable only while ``β^κ · sqrt(d/r) << 1``). See
            NOTE [transfer rules] in ``flora_core.projection``.
        seed: uint64 seed of the projections. The RNG stream of a parameter is its
            position among all parameters given to the optimizer (param_groups
            order, groups added later continue the count), so two optimizers given
            the same parameters in the same order draw the same projections on
            every framework and device, and DDP ranks agree without communication.
        projection: ``"gaussian"`` (default), ``"rademacher"`` or ``"identity"``
            (no compression: a testing mode equal to the base optimizer).
        axis: force the compressed axis (0 or 1 of the ``(shape[0], prod(rest))``
            view); None compresses the smaller one.
        accumulation_steps: τ. With τ > 1 each micro-batch gradient is compressed
            inside backward (a post-accumulate-grad hook) into the ``acc`` state and
            freed at once, so no full-size gradient survives between micro-batches;
            ``step()`` then applies the mean ``decompress(acc) / n`` of the ``n``
            micro-batches seen (``n <= τ``: a short last cycle, as HF ``Trainer``
            makes at the end of an epoch, uses the ones it has; a (τ+1)-th backward
            without ``step()`` raises). Do not divide the loss by τ yourself (HF
            ``Trainer`` does: its mean is then the batch gradient / τ, which Adam
            and Adafactor hardly see but ``max_grad_norm`` compares with).
        layerwise: apply each parameter's update inside backward as soon as its
            gradient is ready and free the gradient at once (LOMO-style; with τ > 1,
            on the τ-th micro-batch). ``step()`` then only applies what no hook did
            (a short last cycle, a gradient set by hand). With τ > 1 and
            ``max_grad_norm`` the τ-th micro-batch's updates wait for ``step()``,
            which clips the global norm first (memory is unchanged: a full-size
            gradient exists for one parameter at a time either way). Not possible
            in this mode (a clear error where it can be detected): global clipping
            with τ = 1 (no global norm exists before the updates),
            ``clip_grad_norm_``, ``torch.amp.GradScaler`` (the update precedes
            unscaling), a ``closure``, and DDP (updates precede the all-reduce).
        max_grad_norm: clip the global 2-norm of the gradients the update uses to
            this value in ``step()``, before any update (``min(1, max_grad_norm /
            (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``). With τ > 1 the
            gradient is the cycle's mean ``decompress(acc) / n``, whose norm is
            computed exactly from the compressed accumulators without a full-size
            gradient (see ``flora_torch._clipping``). Needed wherever the hooks
            consume ``p.grad`` (τ > 1 or ``layerwise``): there
            ``torch.nn.utils.clip_grad_norm_`` and HF ``Trainer``'s
            ``max_grad_norm`` see no gradient, and the optimizer warns once unless
            ``max_grad_norm`` is given (``float("inf")``: no clipping, no warning).
            ``optimizer.clip_grad_norm_(max_norm)`` clips on demand and returns the
            norm.
        foreach: None (default) or True: the grouped (multi-tensor) step, where
            parameters of one param group that share a plan, dtype, device and count
            are updated together by one stacked rule call (about ten buckets for a
            GPT-2, whatever its depth); False: the per-tensor reference path. Both
            give the same numbers up to float32 summation order. DTensor parameters
            and the layer-wise update always take the per-tensor path. See NOTE
            [grouped step] in ``flora_torch._grouped``.
        capturable: keep each ``count`` as an int64 tensor on the parameter's device
            and gate the resample logic arithmetically, so ``step()`` makes no host
            synchronisation and can be captured by a CUDA graph
            (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``).
            Slower in eager mode (the transfer is computed at every step and
            discarded off the resample steps). ``state_dict`` then holds 0-d
            tensor counts; either kind loads into either mode.

    Parameters may be float32, float64, bfloat16 or float16; the optimizer state is
    always float32 (``load_state_dict`` keeps it float32 rather than casting it to
    the parameter dtype as torch does), the update is computed in float32 and a low
    precision parameter is rounded once: ``p <- dtype(float32(p) + update)``.
    Parameters frozen at construction (``requires_grad=False``) get their plan (and
    stream) at once and their state at their first gradient, so unfreezing later
    works. Sparse gradients and complex parameters raise."""

STATE_DOC = """\
    State: ``state_dict()`` holds tensors and ints only (``torch.load(...,
    weights_only=True)`` reads it) and uses the portable schema names per
    parameter: ``count``, ``mu``, ``nu`` or ``nu_row``/``nu_col``, with τ > 1
    ``acc`` and ``micro_step``, and the metadata that regenerates every projection
    (``seed``, ``stream``, ``rank``, ``axis``, ``distribution`` coded as its index in
    ``flora_core.policy.DISTRIBUTIONS``, ``rng_version``). ``export_state(path)`` /
    ``import_state(path)`` move it to and from the framework-free portable form of
    ``flora_core.state`` (format 2, ``.npz`` or ``.safetensors``, written atomically,
    read bounded and checked; Optax, Keras)."""


def interpolate(cls: type) -> type:
    """Fill the shared placeholders of ``cls.__doc__`` (a class decorator)."""
    if cls.__doc__ is not None:
        cls.__doc__ = cls.__doc__.replace("    {flora_args}", FLORA_ARGS).replace(
            "    {state_doc}", STATE_DOC
        )
    return cls
