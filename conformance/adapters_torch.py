"""flora_torch in the conformance registry.

``run`` trains a problem with FloraAdam / FloraAdafactor through torch's own
backward: the linear loss ``sum_i sum(p_i * g_i)`` per micro-batch (its gradient is
exactly ``g_i``), τ backward calls per update when the problem accumulates (the
optimizer's compressed accumulation hooks), then ``step()`` and ``zero_grad()``.

``run_reference`` runs torch-ecosystem optimizers on identity-mode problems:
``torch.optim.AdamW`` for rule "adam" and ``transformers.optimization.Adafactor``
(beta1 = momentum, no relative step) for rule "adafactor". ``torch.optim.Adafactor``
is not a reference: it has no momentum and clips differently. transformers' one is
the same algorithm as optax's except for two rules: it factors every >= 2-D
parameter over its last two axes, while optax factors the two largest axes and only
when the second-largest reaches ``min_dim_size_to_factor`` (the problems' conv
kernel is below it, so the reference optimizes its flat 1-D view, which transformers
does not factor either: the same rule); and its weight decay is scaled by the
learning rate (problems with weight decay are not compared).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from flora_torch import FloraAdafactor, FloraAdam

from conformance.problems import Problem
from conformance.registry import AdapterEntry, register
from flora_core import rules


def _optimizer(problem: Problem, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    common = dict(
        rank=problem.rank, kappa=problem.kappa, seed=problem.seed,
        projection=problem.projection, accumulation_steps=problem.accumulation_steps,
        axis=problem.axis,
    )  # fmt: skip
    config = problem.config()
    if problem.rule == "adam":
        return FloraAdam(
            params, lr=problem.lr, betas=(config.b1, config.b2), eps=config.eps,
            weight_decay=config.weight_decay, factored=config.factored,
            second_moment=config.second_moment, transfer=config.transfer, **common,
        )  # fmt: skip
    return FloraAdafactor(
        params, lr=problem.lr, momentum=config.momentum, decay_rate=config.decay_rate,
        decay_offset=config.decay_offset,
        min_dim_size_to_factor=config.min_dim_size_to_factor,
        clipping_threshold=config.clipping_threshold,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
        weight_decay_rate=config.weight_decay_rate, eps=config.eps,
        factored=config.factored, transfer=config.transfer,
        clip_after_momentum=config.clip_after_momentum, **common,
    )  # fmt: skip


def _train(problem: Problem, params: list[torch.Tensor], optimizer):
    """Backward of the linear loss per micro-batch, then step; params per update.

    A parameter ``problem.absent`` names for a micro-batch is left out of its loss,
    so it gets no gradient there (its hook does not run, ``.grad`` stays None).
    """
    absent = set(problem.absent)
    trajectory = []
    for t, micro_batches in enumerate(problem.grads()):
        for j, grads in enumerate(micro_batches):
            loss = sum(
                (p.view(g.shape) * torch.from_numpy(g)).sum()
                for i, (p, g) in enumerate(zip(params, grads, strict=True))
                if (t, j, i) not in absent
            )
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(
            [p.detach().numpy().reshape(s).copy() for p, s in
             zip(params, problem.shapes, strict=True)]
        )  # fmt: skip
    return trajectory


def _params(problem: Problem) -> list[torch.Tensor]:
    return [torch.nn.Parameter(torch.from_numpy(p)) for p in problem.initial_params()]


def run(problem: Problem) -> list[list[np.ndarray]]:
    params = _params(problem)
    return _train(problem, params, _optimizer(problem, params))


def run_reference(problem: Problem) -> list[list[np.ndarray]]:
    config = problem.config()
    if problem.rule == "adam":
        params = _params(problem)
        optimizer = torch.optim.AdamW(
            params, lr=problem.lr, betas=(config.b1, config.b2), eps=config.eps,
            weight_decay=config.weight_decay, foreach=False,
        )  # fmt: skip
        return _train(problem, params, optimizer)
    from transformers.optimization import Adafactor

    # transformers factors every >= 2-D parameter over its last two axes; where
    # optax's rule does not factor, the reference optimizes the flat (1-D) view.
    flat = [_factoring(problem, s) is None for s in problem.shapes]
    params = [
        torch.nn.Parameter(torch.from_numpy(p.reshape(-1) if f else p))
        for p, f in zip(problem.initial_params(), flat, strict=True)
    ]
    optimizer = Adafactor(
        params, lr=problem.lr, eps=(config.eps, 1e-3),
        clip_threshold=config.clipping_threshold, decay_rate=-config.decay_rate,
        beta1=config.momentum, weight_decay=0.0,
        scale_parameter=config.multiply_by_parameter_scale, relative_step=False,
        warmup_init=False,
    )  # fmt: skip
    return _train(problem, params, optimizer)


def _factoring(problem: Problem, shape: tuple[int, ...]) -> tuple[int, int] | None:
    config = problem.config()
    return rules.factored_dims(shape, config.factored, config.min_dim_size_to_factor)


def supports(problem: Problem) -> bool:
    """Every problem but Keras' epsilon (FloraAdam takes torch's eps); identity
    Adafactor only where transformers' rule coincides."""
    if problem.eps_before_bias_correction:
        return False
    if problem.projection != "identity" or problem.rule == "adam":
        return True
    if problem.clip_after_momentum:  # transformers clips before the momentum
        return False
    if importlib.util.find_spec("transformers") is None:
        return False
    for shape in problem.shapes:  # both rules must average over the same two axes
        dims = _factoring(problem, shape)
        if dims is not None and set(dims) != {len(shape) - 2, len(shape) - 1}:
            return False
    return not problem.config().weight_decay_rate


register(AdapterEntry("torch", run, run_reference, supports, rtol=1e-4, atol=1e-5))
