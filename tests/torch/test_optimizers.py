"""FloraAdam / FloraAdafactor as torch.optim.Optimizers: groups, streams, dtypes, errors."""

from __future__ import annotations

import re

import pytest
import torch
from flora_torch import FloraAdafactor, FloraAdam

OPTIMIZERS = {"adam": FloraAdam, "adafactor": FloraAdafactor}


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 160), torch.nn.Tanh(), torch.nn.Linear(160, 48)
    )
    return model.to(dtype)


def batches(steps: int, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=g).to(dtype) for _ in range(steps)]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().square().mean()


def train(model, optimizer, xs) -> None:
    for x in xs:
        loss_of(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_defaults_compress_weight_matrices(name: str) -> None:
    model = mlp()
    optimizer = OPTIMIZERS[name](model.parameters())
    train(model, optimizer, batches(1))
    w0, w1 = model[0].weight, model[2].weight  # 160 x 64, 48 x 160
    assert optimizer.state[w0]["mu"].shape == (160, 16)  # auto: r = 64 // 4
    assert optimizer.state[w1]["mu"].shape == (12, 160)  # smaller axis (48) compressed
    assert optimizer.state[model[0].bias]["mu"].shape == (160,)  # vectors: full
    assert optimizer.plan_of(w1).axis == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_uncompressed_group_is_adamw(weight_decay: float) -> None:
    m_flora, m_ref = mlp(), mlp()
    flora = FloraAdam(
        m_flora.parameters(), lr=1e-2, weight_decay=weight_decay, rank=None
    )
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, weight_decay=weight_decay)
    xs = batches(5)
    train(m_flora, flora, xs)
    train(m_ref, ref, xs)
    for a, b in zip(m_flora.parameters(), m_ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # ulps of reordering


BAD_COMMON = [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": "fast"}, "Invalid learning rate: 'fast'"),
    ({"rank": 0}, "Invalid rank: 0"),
    ({"rank": "big"}, "Invalid rank: 'big'"),
    ({"kappa": 0}, "Invalid kappa: 0"),
    ({"seed": -1}, "Invalid seed: -1"),
    ({"projection": "normal"}, "'normal'"),
    ({"axis": 2}, "Invalid axis: 2"),
    ({"accumulation_steps": 0}, "Invalid accumulation_steps: 0"),
    ({"layerwise": "yes"}, "Invalid layerwise: 'yes'"),
    ({"factored": 1}, "Invalid factored: 1"),
    ({"eps": -1e-8}, "Invalid eps: -1e-08"),
]
BAD_ADAM = [
    ({"betas": (1.0, 0.999)}, "Invalid beta1: 1.0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta2: -0.1"),
    ({"betas": 0.9}, "Invalid betas: 0.9"),
    ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
    ({"second_moment": "raw"}, "Invalid second_moment: 'raw'"),
]
BAD_ADAFACTOR = [
    ({"momentum": 1.5}, "Invalid momentum: 1.5"),
    ({"decay_rate": -0.8}, "Invalid decay_rate: -0.8"),
    ({"decay_offset": -1}, "Invalid decay_offset: -1"),
    ({"min_dim_size_to_factor": 0}, "Invalid min_dim_size_to_factor: 0"),
    ({"clipping_threshold": 0.0}, "Invalid clipping_threshold: 0.0"),
    ({"weight_decay_rate": -1.0}, "Invalid weight_decay_rate: -1.0"),
]
CASES = [("adam", *c) for c in BAD_COMMON + BAD_ADAM]
CASES += [("adafactor", *c) for c in BAD_COMMON + BAD_ADAFACTOR]


@pytest.mark.parametrize(("name", "kwargs", "message"), CASES)
def test_invalid_hyperparameters_named_at_construction(name, kwargs, message) -> None:
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        OPTIMIZERS[name](model.parameters(), **kwargs)


def test_invalid_group_rejected_and_optimizer_unchanged() -> None:
    model = mlp()
    optimizer = FloraAdam(model[0].parameters())
    with pytest.raises(ValueError, match=re.escape("Invalid rank: 0")):
        optimizer.add_param_group({"params": model[2].parameters(), "rank": 0})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": model[2].parameters(), "rank": 4})
    assert optimizer.plan_of(model[2].weight).param_index == 2


def test_groups_rank_kappa_seed_and_streams() -> None:
    model = mlp()
    optimizer = FloraAdam(
        [{"params": model[0].parameters(), "rank": 8, "seed": 7},
         {"params": [model[2].weight], "rank": None}],
        kappa=3,
    )  # fmt: skip
    optimizer.add_param_group({"params": [model[2].bias], "kappa": 5})
    train(model, optimizer, batches(2))
    params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    plans = [optimizer.plan_of(p) for p in params]
    assert [p.param_index for p in plans] == [0, 1, 2, 3]
    assert [optimizer.state[p]["stream"] for p in params] == [0, 4, 8, 12]
    assert [p.seed for p in plans] == [7, 7, 0, 0]
    assert optimizer.state[model[0].weight]["mu"].shape == (160, 8)
    assert optimizer.state[model[2].weight]["mu"].shape == (48, 160)  # uncompressed
    assert [g["kappa"] for g in optimizer.param_groups] == [3, 3, 5]


def test_same_parameters_same_order_same_projections() -> None:
    model = mlp()
    first = FloraAdam(model.parameters(), rank=8)
    second = FloraAdam(model.parameters(), rank=8)
    reordered = FloraAdam([*model.parameters()][::-1], rank=8)
    loss_of(model, batches(1)[0]).backward()
    for optimizer in (first, second, reordered):
        with torch.no_grad():
            before = [p.clone() for p in model.parameters()]
            optimizer.step()
            for p, b in zip(model.parameters(), before, strict=True):
                p.copy_(b)
    w = model[0].weight
    assert torch.equal(first.state[w]["mu"], second.state[w]["mu"])
    assert not torch.equal(first.state[w]["mu"], reordered.state[w]["mu"])


def test_closure_returns_loss_and_steps() -> None:
    m_closure, m_plain = mlp(), mlp()
    o_closure = FloraAdam(m_closure.parameters(), lr=1e-2, rank=8)
    o_plain = FloraAdam(m_plain.parameters(), lr=1e-2, rank=8)
    for x in batches(3):

        def closure(x=x):
            o_closure.zero_grad()
            loss = loss_of(m_closure, x)
            loss.backward()
            return loss

        loss = o_closure.step(closure)
        assert torch.equal(loss, loss_of(m_plain, x))
        loss_of(m_plain, x).backward()
        o_plain.step()
        o_plain.zero_grad()
    for a, b in zip(m_closure.parameters(), m_plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_lr_scheduler_reads_lr_each_step() -> None:
    m_sched, m_manual = mlp(), mlp()
    o_sched = FloraAdam(m_sched.parameters(), lr=1e-2, rank=8)
    o_manual = FloraAdam(m_manual.parameters(), lr=1e-2, rank=8)
    factors = [1.0, 0.5, 0.0, 0.25, 1.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(o_sched, lambda t: factors[t])
    for t, x in enumerate(batches(4)):
        o_manual.param_groups[0]["lr"] = 1e-2 * factors[t]
        for model, optimizer in ((m_sched, o_sched), (m_manual, o_manual)):
            loss_of(model, x).backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    for a, b in zip(m_sched.parameters(), m_manual.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tensor_lr() -> None:
    m_tensor, m_float = mlp(), mlp()
    o_tensor = FloraAdam(m_tensor.parameters(), lr=torch.tensor(1e-2), rank=8)
    o_float = FloraAdam(m_float.parameters(), lr=1e-2, rank=8)
    xs = batches(2)
    train(m_tensor, o_tensor, xs)
    train(m_float, o_float, xs)
    for a, b in zip(m_tensor.parameters(), m_float.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_frozen_at_construction_then_unfrozen(accumulation_steps: int) -> None:
    model = mlp()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    optimizer = FloraAdam(
        model.parameters(), rank=8, accumulation_steps=accumulation_steps
    )
    xs = batches(6)
    for x in xs[:2]:
        for _ in range(accumulation_steps):
            loss_of(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert frozen not in optimizer.state
    before = frozen.detach().clone()
    frozen.requires_grad_(True)
    for t, x in enumerate(xs[2:]):
        for _ in range(accumulation_steps):
            loss_of(model, x).backward()
            # unfrozen after zero_grad: hooked from the next cycle on (the first
            # cycle's .grad is taken as all its micro-batches at once)
            assert accumulation_steps == 1 or t == 0 or frozen.grad is None
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[frozen]
    assert state["count"] == 4 and state["stream"] == 0
    assert state["mu"].shape == (160, 8)
    assert not torch.equal(frozen, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_low_precision_params_float32_state(dtype: torch.dtype, name: str) -> None:
    m_low, m_ref = mlp(dtype=dtype), mlp(dtype=dtype).float()
    o_low = OPTIMIZERS[name](m_low.parameters(), lr=1e-3, rank=8)
    o_ref = OPTIMIZERS[name](m_ref.parameters(), lr=1e-3, rank=8)
    xs = batches(3)
    train(m_low, o_low, [x.to(dtype) for x in xs])
    train(m_ref, o_ref, xs)
    for p in m_low.parameters():
        assert p.dtype == dtype
        tensors = [v for v in o_low.state[p].values() if torch.is_tensor(v)]
        assert tensors and all(v.dtype == torch.float32 for v in tensors)
    for a, b in zip(m_low.parameters(), m_ref.parameters(), strict=True):
        # bf16 keeps 8 bits of mantissa: compare at its resolution
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def test_sparse_gradient_raises() -> None:
    embedding = torch.nn.Embedding(100, 40, sparse=True)
    optimizer = FloraAdam(embedding.parameters())
    embedding(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()


def test_complex_parameter_raises() -> None:
    param = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="Complex parameters are not supported"):
        FloraAdam([param])


def test_changed_plan_argument_raises() -> None:
    model = mlp()
    optimizer = FloraAdam(model.parameters(), rank=8)
    optimizer.param_groups[0]["rank"] = 4
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match="'rank'.* changed from 8 to 4"):
        optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_skips_inf_and_unscales(name: str) -> None:
    m_scaled, m_plain = mlp(), mlp()
    o_scaled = OPTIMIZERS[name](m_scaled.parameters(), lr=1e-2, rank=8)
    o_plain = OPTIMIZERS[name](m_plain.parameters(), lr=1e-2, rank=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t, x in enumerate(batches(4)):
        loss = loss_of(m_scaled, x)
        scaler.scale(loss * (float("inf") if t == 1 else 1.0)).backward()
        scaler.step(o_scaled)
        scaler.update()
        o_scaled.zero_grad()
        if t == 1:
            assert (
                scaler.get_scale() == 2.0**11
                and o_scaled.state[m_scaled[0].weight]["count"] == 1
            )
            continue
        loss_of(m_plain, x).backward()
        o_plain.step()
        o_plain.zero_grad()
    for a, b in zip(m_scaled.parameters(), m_plain.parameters(), strict=True):
        assert torch.equal(a, b)  # power-of-two scales unscale exactly
