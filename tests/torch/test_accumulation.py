"""Compressed accumulation in backward hooks, and the layer-wise update."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam
from flora_torch._checkpoint import XP

from conformance.make_vectors import load_oracle
from conformance.problems import PROBLEMS
from flora_core import accumulation

OPTIMIZERS = {"adam": FloraAdam, "adafactor": FloraAdafactor}


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 160), torch.nn.Tanh(), torch.nn.Linear(160, 48)
    )


def micro_batches(steps: int, tau: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(8, 64, generator=g) for _ in range(tau)] for _ in range(steps)]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def run(model, optimizer, data, check_freed: bool = False) -> None:
    for cycle in data:
        for j, x in enumerate(cycle):
            loss_of(model, x).backward()
            if check_freed:
                assert all(p.grad is None for p in model.parameters())
                states = [optimizer.state[p] for p in model.parameters()]
                assert all(s["micro_step"] == j + 1 for s in states)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("problem", ["adam_accumulate", "adafactor_accumulate"])
def test_follows_oracle_and_frees_every_micro_batch_gradient(problem: str) -> None:
    spec = PROBLEMS[problem]
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in spec.initial_params()]
    config = spec.config()
    if spec.rule == "adam":
        optimizer = FloraAdam(
            params, lr=spec.lr, rank=spec.rank, kappa=spec.kappa, seed=spec.seed,
            factored=config.factored, accumulation_steps=spec.accumulation_steps,
        )  # fmt: skip
    else:
        optimizer = FloraAdafactor(
            params, lr=spec.lr, rank=spec.rank, kappa=spec.kappa, seed=spec.seed,
            min_dim_size_to_factor=config.min_dim_size_to_factor,
            accumulation_steps=spec.accumulation_steps,
        )  # fmt: skip
    for t, cycle in enumerate(spec.grads()):
        for grads in cycle:
            sum(
                (p * torch.from_numpy(g)).sum()
                for p, g in zip(params, grads, strict=True)
            ).backward()
            assert all(p.grad is None for p in params)  # nothing full-size survives
        optimizer.step()
        optimizer.zero_grad()
        for p, want in zip(params, load_oracle(problem)[t], strict=True):
            np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-4, atol=1e-5)
    acc = optimizer.state[params[0]]["acc"]  # 48 x 40 compressed along 40 -> 48 x 6
    assert (
        acc.shape == (48, spec.rank) and optimizer.state[params[0]]["micro_step"] == 0
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hooks_free_gradients_and_count_micro_steps(name: str) -> None:
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters(), rank=8, accumulation_steps=3)
    run(model, optimizer, micro_batches(2, 3), check_freed=True)
    assert optimizer.state[model[0].weight]["acc"].shape == (160, 8)
    assert optimizer.state[model[0].weight]["count"] == 2


def test_uncompressed_accumulation_is_the_mean_gradient_bitwise() -> None:
    m_acc, m_mean = mlp(), mlp()
    o_acc = FloraAdam(m_acc.parameters(), lr=1e-2, rank=None, accumulation_steps=3)
    o_mean = FloraAdam(m_mean.parameters(), lr=1e-2, rank=None)
    data = micro_batches(3, 3)
    run(m_acc, o_acc, data)
    for cycle in data:
        grads = []
        for x in cycle:
            grads.append(
                torch.autograd.grad(loss_of(m_mean, x), list(m_mean.parameters()))
            )
        for p, *gs in zip(m_mean.parameters(), *grads, strict=True):
            p.grad = ((torch.zeros_like(gs[0]) + gs[0]) + gs[1] + gs[2]) / 3.0
        o_mean.step()
        o_mean.zero_grad()
    for a, b in zip(m_acc.parameters(), m_mean.parameters(), strict=True):
        assert torch.equal(a, b)


class TwoBranches(torch.nn.Module):
    """``always`` sees every micro-batch; ``sometimes`` only those with ``use``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.always = torch.nn.Linear(64, 48)
        self.sometimes = torch.nn.Linear(64, 48)

    def forward(self, x: torch.Tensor, use: bool) -> torch.Tensor:
        y = self.always(x)
        return (y + self.sometimes(x) if use else y).square().mean()


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_parameter_skipped_in_some_micro_batches_gets_the_cycle_mean(
    name: str, layerwise: bool
) -> None:
    """NOTE [accumulation divisor]: 1/τ for every parameter (an MoE expert used in 1
    of 4 micro-batches gets a quarter of its gradient, not all of it)."""
    tau = 4  # the branch is used in 1, then 3 of the 4 micro-batches of a cycle
    cycles = [(True, False, False, False), (False, True, True, True)]
    model, reference = TwoBranches(), TwoBranches()
    optimizer = OPTIMIZERS[name](
        model.parameters(), lr=1e-2, rank=8, accumulation_steps=tau,
        layerwise=layerwise,
    )  # fmt: skip
    plain = OPTIMIZERS[name](reference.parameters(), lr=1e-2, rank=8)
    params = list(reference.parameters())
    g = torch.Generator().manual_seed(3)
    for uses in cycles:
        xs = [torch.randn(8, 64, generator=g) for _ in range(tau)]
        sums = [torch.zeros(plain.plan_of(p).state_shape if plain.plan_of(p).compressed
                            else p.shape) for p in params]  # fmt: skip
        for x, use in zip(xs, uses, strict=True):
            model(x, use).backward()
            grads = torch.autograd.grad(reference(x, use), params, allow_unused=True)
            for k, (p, grad) in enumerate(zip(params, grads, strict=True)):
                if grad is not None:
                    sums[k] = accumulation.accumulate(
                        sums[k], grad, plain.state[p].get("count", 0),
                        plan=plain.plan_of(p), xp=XP,
                    )  # fmt: skip
        for k, p in enumerate(params):
            p.grad = accumulation.accumulated_gradient(
                sums[k], plain.state[p].get("count", 0), tau, plan=plain.plan_of(p),
                xp=XP,
            )  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
        plain.step()
        plain.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_short_cycle_uses_the_micro_batches_seen() -> None:
    m_short, m_full = mlp(), mlp()
    o_short = FloraAdam(m_short.parameters(), lr=1e-2, rank=8, accumulation_steps=3)
    o_full = FloraAdam(m_full.parameters(), lr=1e-2, rank=8, accumulation_steps=2)
    data = micro_batches(2, 2)  # 2 micro-batches per cycle, fewer than tau = 3
    run(m_short, o_short, data)
    run(m_full, o_full, data)
    for a, b in zip(m_short.parameters(), m_full.parameters(), strict=True):
        assert torch.equal(a, b)


def test_more_micro_batches_than_tau_raises() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2)
    x = micro_batches(1, 1)[0][0]
    for _ in range(2):
        loss_of(model, x).backward()
    with pytest.raises(
        RuntimeError, match="more than accumulation_steps=2 micro-batch"
    ):
        loss_of(model, x).backward()
    assert optimizer.state[model[2].weight]["micro_step"] == 2


@pytest.mark.parametrize("tau", [1, 3])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_layerwise_equals_step(name: str, tau: int) -> None:
    m_layer, m_step = mlp(), mlp()
    o_layer = OPTIMIZERS[name](m_layer.parameters(), rank=8, accumulation_steps=tau,
                               layerwise=True)  # fmt: skip
    o_step = OPTIMIZERS[name](m_step.parameters(), rank=8, accumulation_steps=tau)
    data = micro_batches(3, tau)
    for cycle in data:
        for x in cycle:
            loss_of(m_layer, x).backward()
            assert all(p.grad is None for p in m_layer.parameters())
        o_layer.step()  # nothing left to do
    run(m_step, o_step, data)
    for a, b in zip(m_layer.parameters(), m_step.parameters(), strict=True):
        assert torch.equal(a, b)


def test_layerwise_limits_are_enforced() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, layerwise=True)
    with pytest.raises(RuntimeError, match="layerwise=True.*closure"):
        optimizer.step(lambda: loss_of(model, micro_batches(1, 1)[0][0]))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, micro_batches(1, 1)[0][0])).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(RuntimeError, match="layerwise=True.*GradScaler"):
            scaler.step(optimizer)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_with_compressed_accumulation(name: str) -> None:
    m_scaled, m_plain = mlp(), mlp()
    o_scaled = OPTIMIZERS[name](
        m_scaled.parameters(), lr=1e-2, rank=8, accumulation_steps=2
    )
    o_plain = OPTIMIZERS[name](
        m_plain.parameters(), lr=1e-2, rank=8, accumulation_steps=2
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t, cycle in enumerate(micro_batches(4, 2)):
        for j, x in enumerate(cycle):
            bad = t == 1 and j == 0
            scaler.scale(
                loss_of(m_scaled, x) * (float("inf") if bad else 1.0)
            ).backward()
        with (
            warnings.catch_warnings()
        ):  # torch: the grad_scaler= contract is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            scaler.step(o_scaled)
        scaler.update()
        o_scaled.zero_grad()
        if t == 1:  # skipped, scale backed off, the cycle dropped
            assert scaler.get_scale() == 2.0**11
            assert o_scaled.state[m_scaled[0].weight]["micro_step"] == 0
            assert o_scaled.state[m_scaled[0].weight]["count"] == 1
            continue
        run(m_plain, o_plain, [cycle])
    for a, b in zip(m_scaled.parameters(), m_plain.parameters(), strict=True):
        assert torch.equal(a, b)  # power-of-two scales compress and unscale exactly
