"""Global-norm clipping where the hooks consume gradients (``flora_torch._clipping``).

The reference for every clipped run is the definition: materialise each
parameter's mean gradient ``decompress(acc) / n`` with ``flora_core.accumulation``,
take the global norm in float64, scale by ``min(1, c / (norm + 1e-6))`` and give the
result to an optimizer without hooks as ``p.grad``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam
from flora_torch._checkpoint import XP
from flora_torch._clipping import accumulated_square_norm

from flora_core import accumulation, policy

OPTIMIZERS = {"adam": FloraAdam, "adafactor": FloraAdafactor}


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 160), torch.nn.Tanh(), torch.nn.Linear(160, 48)
    )


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 64, generator=g) for _ in range(n)]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def mean_gradients(optimizer, params) -> list[torch.Tensor]:
    """Each pending ``decompress(acc) / n``, materialised by the core (float32)."""
    out = []
    for p in params:
        state = optimizer.state[p]
        steps = max(optimizer._cycle_micro_steps, state["micro_step"])
        out.append(accumulation.accumulated_gradient(
            state["acc"], state["count"], steps, plan=optimizer.plan_of(p), xp=XP
        ))  # fmt: skip
    return out


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


# ------------------------------------------------------------- the norm itself
@pytest.mark.parametrize(
    ("shape", "rank", "distribution"),
    [((160, 64), 8, "gaussian"), ((48, 160), 12, "gaussian"),
     ((64, 3, 3, 3), 4, "rademacher"), ((256, 96), 24, "identity"),
     ((160,), None, "gaussian")],
)  # fmt: skip
def test_norm_in_rxr_space_is_the_decompressed_norm(shape, rank, distribution) -> None:
    """NOTE [norm in r x r space]: exact up to float32 rounding (measured <= 1e-7
    relative against float64; the bound asserted is 1e-6)."""
    plan = policy.plan(shape, 3, rank=rank, seed=5, distribution=distribution)
    g = torch.Generator().manual_seed(0)
    acc = torch.zeros(accumulation.accumulator_shape(plan))
    for _ in range(3):
        grad = torch.randn(shape, generator=g)
        acc = accumulation.accumulate(acc, grad, 7, plan=plan, xp=XP)
    fast = accumulated_square_norm(acc, 7, 3, plan=plan).sqrt()
    full = accumulation.accumulated_gradient(acc.double(), 7, 3, plan=plan, xp=XP)
    assert fast.dtype == torch.float32
    assert abs(float(fast) - float(full.norm())) <= 1e-6 * float(full.norm())


def test_norm_of_zero_accumulator_is_zero_not_nan() -> None:
    plan = policy.plan((160, 64), 0, rank=8, seed=0)
    acc = torch.full(accumulation.accumulator_shape(plan), 1e-30)
    assert float(accumulated_square_norm(acc, 0, 1, plan=plan)) == 0.0


# -------------------------------------------------- clipping under accumulation
def clipped_reference_run(name: str, c: float, tau: int, data, **kwargs):
    """The definition, step by step: a probe (lr 0, no clipping) on the same
    trajectory accumulates each cycle; its mean gradients, materialised and clipped
    in float64, are applied by a hook-free twin as ``p.grad``."""
    model, twin = mlp(), mlp()
    probe = OPTIMIZERS[name](model.parameters(), lr=0.0, rank=8, accumulation_steps=tau,
                             max_grad_norm=math.inf, **kwargs)  # fmt: skip
    plain = OPTIMIZERS[name](twin.parameters(), rank=8, **kwargs)
    coefs = []
    for xs in data:
        for x in xs:
            loss_of(model, x).backward()
        grads = mean_gradients(probe, list(model.parameters()))
        coef = min(1.0, c / (global_norm(grads) + 1e-6))
        coefs.append(coef)
        for p, grad in zip(twin.parameters(), grads, strict=True):
            p.grad = grad * coef
        plain.step()
        plain.zero_grad()
        probe.step()  # lr 0: only the cycle advances (count, fresh accumulators)
        with torch.no_grad():  # the probe follows the reference's trajectory
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                p.copy_(q)
    return twin, plain, coefs


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_max_grad_norm_clips_the_accumulated_mean(name: str, layerwise: bool) -> None:
    tau, c = 3, 0.05
    data = [batches(tau, seed=s) for s in range(4)]
    reference, plain, coefs = clipped_reference_run(name, c, tau, data)
    assert max(coefs) < 0.5  # the clipping bites on every step
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters(), rank=8, accumulation_steps=tau,
                                 layerwise=layerwise, max_grad_norm=c)  # fmt: skip
    for xs in data:
        before = [p.detach().clone() for p in model.parameters()]
        for x in xs:
            loss_of(model, x).backward()
            assert all(p.grad is None for p in model.parameters())
        # layerwise too: the updates wait for step(), which knows the global norm
        assert all(
            torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
        )
        optimizer.step()
        optimizer.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # r x r vs float64 norm
        # Adam and Adafactor updates hardly see a gradient's scale; the moments do
        state, want = optimizer.state[a], plain.state[b]
        for key in ("mu", "nu", "nu_row", "nu_col"):
            if key in want:
                scale = float(want[key].abs().max())  # float32 cancellation near 0
                torch.testing.assert_close(
                    state[key], want[key], rtol=1e-5, atol=1e-5 * scale
                )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_clip_grad_norm_method_returns_the_norm_and_equals_max_grad_norm(
    name: str,
) -> None:
    tau, c = 2, 0.05
    m_method, m_option = mlp(), mlp()
    o_method = OPTIMIZERS[name](m_method.parameters(), rank=8, accumulation_steps=tau,
                                max_grad_norm=math.inf)  # fmt: skip
    o_option = OPTIMIZERS[name](m_option.parameters(), rank=8, accumulation_steps=tau,
                                max_grad_norm=c)  # fmt: skip
    for s in range(3):
        for x in batches(tau, seed=s):
            loss_of(m_method, x).backward()
            loss_of(m_option, x).backward()
        want = global_norm(mean_gradients(o_method, list(m_method.parameters())))
        norm = o_method.clip_grad_norm_(c)
        assert norm.dtype == torch.float32 and norm.ndim == 0
        assert abs(float(norm) - want) <= 1e-6 * want
        clipped = global_norm(mean_gradients(o_method, list(m_method.parameters())))
        assert abs(clipped - c) <= 1e-5 * c  # scaled to the threshold
        o_method.step()
        o_option.step()
    for a, b in zip(m_method.parameters(), m_option.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_without_hooks_clipping_is_torchs(name: str) -> None:
    """τ = 1: ``p.grad`` exists; the method and ``max_grad_norm`` are
    ``torch.nn.utils.clip_grad_norm_`` over the optimizer's parameters."""
    models = [mlp(), mlp(), mlp()]
    o_torch = OPTIMIZERS[name](models[0].parameters(), rank=8)
    o_method = OPTIMIZERS[name](models[1].parameters(), rank=8)
    o_option = OPTIMIZERS[name](models[2].parameters(), rank=8, max_grad_norm=0.05)
    for x in batches(3):
        for model in models:
            loss_of(model, x).backward()
        want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.05)
        assert torch.equal(o_method.clip_grad_norm_(0.05), want)
        for optimizer in (o_torch, o_method, o_option):
            optimizer.step()
            optimizer.zero_grad()
    for model in models[1:]:
        for a, b in zip(models[0].parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)


def test_clip_includes_a_gradient_set_by_hand() -> None:
    """A ``.grad`` the hooks never saw is folded in before the norm, as step() does."""
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2,
                          max_grad_norm=math.inf)  # fmt: skip
    for x in batches(2):
        loss_of(model, x).backward()
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra]})
    extra.grad = torch.tensor([3.0, 4.0, 0.0])  # the sum of 2 micro-batches
    params = list(model.parameters())
    base = global_norm(mean_gradients(optimizer, params))
    norm = optimizer.clip_grad_norm_(math.inf)
    assert extra.grad is None
    assert abs(float(norm) - math.hypot(base, 2.5)) <= 1e-6 * float(norm)


def test_error_if_nonfinite() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2,
                          max_grad_norm=math.inf)  # fmt: skip
    (loss_of(model, batches(1)[0]) * float("inf")).backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert not torch.isfinite(optimizer.clip_grad_norm_(1.0))


def test_norm_type_other_than_2_raises() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2,
                          max_grad_norm=math.inf)  # fmt: skip
    with pytest.raises(ValueError, match="norm_type=2 only"):
        optimizer.clip_grad_norm_(1.0, norm_type=math.inf)


# ------------------------------------------------------- never a silent no-op
def test_host_clip_sees_nothing_and_the_optimizer_says_so_once() -> None:
    """Regression (issue 17): with τ > 1 ``torch.nn.utils.clip_grad_norm_`` finds no
    gradient and returns 0; the optimizer warns once, naming the fix."""
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2)
    for t in range(2):
        for x in batches(2, seed=t):
            loss_of(model, x).backward()
        assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
        messages = [str(w.message) for w in caught if w.category is UserWarning]
        if t == 0:
            assert len(messages) == 1
            assert "clip nothing" in messages[0] and "max_grad_norm=" in messages[0]
        else:
            assert messages == []  # once per optimizer
        optimizer.zero_grad()


@pytest.mark.parametrize("declared", ["inf", "method"])
def test_no_warning_once_clipping_is_declared(declared: str) -> None:
    model = mlp()
    kwargs = {"max_grad_norm": math.inf} if declared == "inf" else {}
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2, **kwargs)
    for x in batches(2):
        loss_of(model, x).backward()
    if declared == "method":
        optimizer.clip_grad_norm_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()


def test_layerwise_limits() -> None:
    model = mlp()
    with pytest.warns(
        UserWarning, match="layerwise=True.*accumulation_steps=2 or more"
    ):
        FloraAdam(model.parameters(), rank=8, layerwise=True)
    with pytest.raises(ValueError, match="cannot clip: each update is applied inside"):
        FloraAdam(model.parameters(), rank=8, layerwise=True, max_grad_norm=1.0)
    optimizer = FloraAdam(model.parameters(), rank=8, layerwise=True,
                          accumulation_steps=2, max_grad_norm=1.0)  # fmt: skip
    with pytest.raises(RuntimeError, match="pass max_grad_norm"):
        optimizer.clip_grad_norm_(1.0)


# ----------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_clips_after_unscaling(name: str) -> None:
    """The norm of the scaled accumulators times ``1/scale``: with a power-of-two
    scale the run is bitwise the unscaled one."""
    m_scaled, m_plain = mlp(), mlp()
    kwargs = {"rank": 8, "accumulation_steps": 2, "max_grad_norm": 0.05}
    o_scaled = OPTIMIZERS[name](m_scaled.parameters(), **kwargs)
    o_plain = OPTIMIZERS[name](m_plain.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for s in range(3):
        for x in batches(2, seed=s):
            scaler.scale(loss_of(m_scaled, x)).backward()
            loss_of(m_plain, x).backward()
        with warnings.catch_warnings():  # torch: the grad_scaler= contract
            warnings.simplefilter("ignore", FutureWarning)
            scaler.step(o_scaled)
        scaler.update()
        o_plain.step()
    for a, b in zip(m_scaled.parameters(), m_plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_with_the_method_raises() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8, accumulation_steps=2,
                          max_grad_norm=math.inf)  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x in batches(2):
        scaler.scale(loss_of(model, x)).backward()
    optimizer.clip_grad_norm_(1.0)  # on still-scaled accumulators
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(RuntimeError, match="GradScaler had not unscaled"):
            scaler.step(optimizer)
