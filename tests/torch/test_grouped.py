"""The grouped (multi-tensor) step against the per-tensor reference.

Same parameters and state after 2κ+3 updates (two resamples) on both compressed
axes, for every parameter dtype and over the conformance problems; stacked state
is per-parameter views that survive ``state_dict``; aten ops per step grow with the
number of buckets, not of parameters; ``capturable=True`` makes no host read;
``torch.compile(step)`` follows eager without recompiling at a resample.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam
from torch.utils._python_dispatch import TorchDispatchMode

from conformance import problems as conformance_problems
from flora_core import rng

KAPPA = 2
STEPS = 2 * KAPPA + 3  # crosses two resample boundaries
KINDS = {
    "adam": (FloraAdam, {}),
    "adam_factored_wd": (FloraAdam, {"factored": True, "weight_decay": 0.1}),
    "adafactor": (FloraAdafactor, {}),
    "adafactor_optax_order": (
        FloraAdafactor,
        {"clip_after_momentum": False, "weight_decay_rate": 0.01},
    ),
}
# float32 summation order: per-member reductions of a stack may sum in another order
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-5, 1e-6),
    torch.bfloat16: (0.0, 0.0),  # rounded to bf16: bit-identical in practice
    torch.float16: (1e-3, 1e-3),
}


def tower(layers: int = 3, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Same-shaped hidden layers (stacks of several members) between two others."""
    torch.manual_seed(0)
    modules = [torch.nn.Linear(24, 80), torch.nn.Tanh()]
    for _ in range(layers):
        modules += [torch.nn.Linear(80, 80), torch.nn.Tanh()]
    modules.append(torch.nn.Linear(80, 40))
    return torch.nn.Sequential(*modules).to(dtype)


def train(model, optimizer, steps: int = STEPS, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g).to(dtype)
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def pair(kind: str, dtype=torch.float32, **kwargs):
    cls, extra = KINDS[kind]
    models = [tower(dtype=dtype), tower(dtype=dtype)]
    common = dict(lr=1e-2, rank=8, kappa=KAPPA, **extra, **kwargs)
    reference = cls(models[0].parameters(), foreach=False, **common)
    grouped = cls(models[1].parameters(), **common)
    return models, (reference, grouped)


def assert_same(models, optimizers, rtol: float, atol: float) -> None:
    (m_ref, m_grp), (o_ref, o_grp) = models, optimizers
    for a, b in zip(m_ref.parameters(), m_grp.parameters(), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
        s_ref, s_grp = o_ref.state[a], o_grp.state[b]
        assert sorted(s_ref) == sorted(s_grp)
        for name, want in s_ref.items():
            got = s_grp[name]
            if torch.is_tensor(want) and want.is_floating_point():
                assert got.shape == want.shape and got.dtype == torch.float32
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            else:
                assert int(got) == int(want), name


@pytest.mark.parametrize("axis", [0, 1, None])
@pytest.mark.parametrize("dtype", sorted(TOLERANCE, key=str))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_grouped_equals_per_tensor(kind: str, dtype: torch.dtype, axis) -> None:
    models, optimizers = pair(kind, dtype, axis=axis)
    for model, optimizer in zip(models, optimizers, strict=True):
        train(model, optimizer)
    assert_same(models, optimizers, *TOLERANCE[dtype])
    stacks = optimizers[1]._stacks.values()
    assert max(len(s.params) for s in stacks) >= 3  # the hidden layers stacked
    assert not optimizers[0]._stacks  # foreach=False never stacks


def _problem_optimizer(problem, params, foreach):
    config = problem.config()
    common = dict(
        lr=problem.lr, rank=problem.rank, kappa=problem.kappa, seed=problem.seed,
        projection=problem.projection, accumulation_steps=problem.accumulation_steps,
        transfer=config.transfer, factored=config.factored, foreach=foreach,
    )  # fmt: skip
    if problem.rule == "adam":
        return FloraAdam(params, weight_decay=config.weight_decay, **common)
    return FloraAdafactor(
        params, min_dim_size_to_factor=config.min_dim_size_to_factor,
        weight_decay_rate=config.weight_decay_rate,
        clip_after_momentum=config.clip_after_momentum, **common,
    )  # fmt: skip


def _run_problem(problem, foreach):
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in problem.initial_params()]
    optimizer = _problem_optimizer(problem, params, foreach)
    for micro_batches in problem.grads():
        for grads in micro_batches:
            sum(
                (p * torch.from_numpy(g)).sum()
                for p, g in zip(params, grads, strict=True)
            ).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().numpy() for p in params], optimizer


@pytest.mark.parametrize("name", sorted(conformance_problems.PROBLEMS))
def test_conformance_problems_grouped(name: str) -> None:
    # every shape twice, so each bucket stacks two members
    base = conformance_problems.PROBLEMS[name]
    problem = dataclasses.replace(base, shapes=base.shapes * 2)
    grouped, optimizer = _run_problem(problem, None)
    reference, _ = _run_problem(problem, False)
    oracle = conformance_problems.oracle(problem)[-1]
    for got, want, core in zip(grouped, reference, oracle, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, core, rtol=1e-4, atol=1e-5)
    assert {len(s.params) for s in optimizer._stacks.values()} == {2}


def test_state_is_views_of_stacks_and_round_trips() -> None:
    models, (reference, grouped) = pair("adam")
    for model, optimizer in zip(models, (reference, grouped), strict=True):
        train(model, optimizer, steps=3)
    hidden = [m.weight for m in models[1] if isinstance(m, torch.nn.Linear)][1:4]
    stack = grouped._stacks[tuple(grouped.plan_of(p).param_index for p in hidden)]
    for b, p in enumerate(hidden):
        mu = grouped.state[p]["mu"]
        assert mu.shape == (80, 8) and mu.data_ptr() == stack.fields["mu"][b].data_ptr()
    buffer = io.BytesIO()
    torch.save(grouped.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = FloraAdam(models[1].parameters(), lr=1e-2, rank=8, kappa=KAPPA)
    resumed.load_state_dict(loaded)
    resumed_model = models[1]
    snapshot = [p.detach().clone() for p in resumed_model.parameters()]
    train(resumed_model, resumed, steps=4, seed=5)
    after_resume = [p.detach().clone() for p in resumed_model.parameters()]
    with torch.no_grad():
        for p, s in zip(resumed_model.parameters(), snapshot, strict=True):
            p.copy_(s)
    train(resumed_model, grouped, steps=4, seed=5)  # the uninterrupted optimizer
    for a, b in zip(resumed_model.parameters(), after_resume, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("source", [False, True])
def test_int_and_tensor_counts_load_into_either_mode(source: bool) -> None:
    model = tower()
    saver = FloraAdam(model.parameters(), rank=8, kappa=KAPPA, capturable=source)
    train(model, saver, steps=3)
    state = saver.state_dict()
    loader = FloraAdam(model.parameters(), rank=8, kappa=KAPPA, capturable=not source)
    loader.load_state_dict(state)
    count = loader.state[model[0].weight]["count"]
    assert isinstance(count, torch.Tensor) == (not source) and int(count) == 3
    train(model, loader, steps=2)
    assert int(loader.state[model[0].weight]["count"]) == 5


class OpCounter(TorchDispatchMode):
    """Top-level aten calls (a multi-tensor op counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_per_step(layers: int, **kwargs) -> list[str]:
    model = tower(layers)
    optimizer = FloraAdam(model.parameters(), lr=1e-2, rank=8, kappa=100, **kwargs)
    train(model, optimizer, steps=2)  # warm: state and stacks exist
    model(torch.randn(4, 24)).square().mean().backward()
    with OpCounter() as counter:
        optimizer.step()
    return counter.ops


def test_aten_ops_grow_with_buckets_not_parameters() -> None:
    assert len(ops_per_step(2)) == len(ops_per_step(6))
    per_tensor = [len(ops_per_step(n, foreach=False)) for n in (2, 6)]
    assert per_tensor[1] > per_tensor[0] + 4 * 2 * 5  # ~10+ ops per extra tensor


def test_capturable_makes_no_host_read(monkeypatch) -> None:
    # On CUDA the RNG runs on the device; on CPU a host step may take the numpy
    # path, which reads the count. Force the device path, as on a GPU.
    monkeypatch.setattr(rng, "_on_host_numpy", lambda *args: False)
    models, (reference, grouped) = pair("adam", capturable=True)
    for model, optimizer in zip(models, (reference, grouped), strict=True):
        train(model, optimizer, steps=KAPPA + 1)
    models[1](torch.randn(4, 24)).square().mean().backward()
    with OpCounter() as counter:
        for _ in range(KAPPA):  # through a resample boundary
            grouped.step()
    assert "aten._local_scalar_dense" not in counter.ops  # .item(), int(), bool()
    assert isinstance(grouped.state[models[1][0].weight]["count"], torch.Tensor)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_capturable_follows_eager(kind: str) -> None:
    models, optimizers = pair(kind, capturable=True)
    for model, optimizer in zip(models, optimizers, strict=True):
        train(model, optimizer)
    # traced bias corrections use expm1 (NOTE [bias correction]): ulps apart
    assert_same(models, optimizers, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("kind", ["adam", "adafactor"])
def test_clipped_accumulation_and_copies_follow_per_tensor(
    kind: str, capturable: bool
) -> None:
    """Issue 17 on the grouped path: ``max_grad_norm`` scales ``acc`` (not stacked)
    while the rule's state is views of stacks, and a deep copy taken mid-run (its
    stacks rebuilt, NOTE [copies of stacks]) goes on like the original."""
    models, optimizers = pair(
        kind, accumulation_steps=2, max_grad_norm=0.05, capturable=capturable
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 24, generator=g) for _ in range(2 * STEPS)]
    for step in range(STEPS):
        if step == KAPPA + 1:  # the grouped side continues as a copy
            models[1], grouped = copy.deepcopy((models[1], optimizers[1]))
            optimizers = (optimizers[0], grouped)
        for model, optimizer in zip(models, optimizers, strict=True):
            for x in batches[2 * step : 2 * step + 2]:
                model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert_same(models, optimizers, rtol=1e-4, atol=1e-6)


def test_compiled_step_follows_eager() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # global: earlier tests' compiles would count here too

    models = [torch.nn.Linear(24, 40), torch.nn.Linear(24, 40)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        FloraAdam(m.parameters(), lr=1e-2, rank=4, kappa=KAPPA) for m in models
    ]
    step = torch.compile(optimizers[1].step)
    g = torch.Generator().manual_seed(3)
    graphs = []
    for _ in range(STEPS):
        x = torch.randn(8, 24, generator=g)
        runs = (optimizers[0].step, step)
        for model, optimizer, run in zip(models, optimizers, runs, strict=True):
            model(x).square().mean().backward()
            run()
            optimizer.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    # the first call prepares the stacks (a graph break); then one graph serves every
    # step, across both resample boundaries
    assert graphs[1] == graphs[-1] <= 3
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert optimizers[1].capturable  # NOTE [compiled counts]
