"""flora_torch.velora: gradients, saved bytes, v, checkpoint, compile and PEFT."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flora_torch.velora import (  # noqa: E402
    VeLoRALinear,
    apply_velora,
    velora_linear,
)
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from flora_core import velora  # noqa: E402

F64_TOL = {"rtol": 1e-10, "atol": 1e-10}
F32_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 matmuls of <= 64 terms
CASES = [  # (leading shape, D, out, M)
    ((4, 6), 32, 16, 8),
    ((5,), 24, 7, 3),
    ((2, 3, 4), 16, 5, 16),
    ((3,), 12, 4, 1),
]


def _numpy_x_hat(x: np.ndarray, v: np.ndarray, m: int) -> np.ndarray:
    """x̂ = ungroup((group(x) · v) vᵀ), written with einsum (independent of the core)."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    z = np.einsum("...gm,m->...g", g, v)
    return np.einsum("...g,m->...gm", z, v).reshape(x.shape)


def _unit(m: int, seed: int = 3) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(m)
    return v / np.linalg.norm(v)


def _grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize(("lead", "d", "out", "m"), CASES)
def test_gradients(lead, d, out, m):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    b = torch.randn(out, generator=gen, dtype=torch.float64)
    g = torch.randn(*lead, out, generator=gen, dtype=torch.float64)
    v = _unit(m)
    vt = torch.from_numpy(v)
    y, gx, gw, gb = _grads(lambda x, w, b: velora_linear(x, w, b, vt, m), x, w, b, g)
    y0, gx0, gw0, gb0 = _grads(nn.functional.linear, x, w, b, g)
    torch.testing.assert_close(y, y0, **F64_TOL)  # the forward is exact
    torch.testing.assert_close(gx, gx0, **F64_TOL)  # ∂x = ∂y W, exact
    torch.testing.assert_close(gb, gb0, **F64_TOL)  # ∂b = Σ ∂y, exact
    x_hat = _numpy_x_hat(x.numpy(), v, m)
    expected = g.numpy().reshape(-1, out).T @ x_hat.reshape(-1, d)  # ∂W = ∂yᵀ x̂
    np.testing.assert_allclose(gw.numpy(), expected, **F64_TOL)
    if m > 1:
        assert not torch.allclose(gw, gw0, **F64_TOL)  # it really is compressed


@pytest.mark.parametrize("d", [1, 8])
def test_group_size_one_with_v_one_is_exact(d):
    x, w, b = torch.randn(4, 3, d), torch.randn(5, d), torch.randn(5)
    g = torch.randn(4, 3, 5)
    one = torch.ones(1)
    _, gx, gw, gb = _grads(lambda x, w, b: velora_linear(x, w, b, one, 1), x, w, b, g)
    _, gx0, gw0, gb0 = _grads(nn.functional.linear, x, w, b, g)
    for got, want in ((gx, gx0), (gw, gw0), (gb, gb0)):
        torch.testing.assert_close(got, want, **F32_TOL)


def _saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of the tensors autograd saves while running ``fn``, parameters excluded.

    A parameter may be saved as a view (F.linear saves ``weight.t()``), so tensors are
    matched to parameters by storage.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    records = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            records.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(records)


@pytest.mark.parametrize("m", [4, 16, 32])
def test_saved_bytes_drop_by_group_size(m):
    linear = nn.Linear(64, 48)
    x = torch.randn(16, 32, 64)
    plain = _saved_bytes(lambda: linear(x), linear)
    layer = VeLoRALinear(nn.Linear(64, 48), m)
    layer(x)  # the first batch sets v
    compressed = _saved_bytes(lambda: layer(x), layer)
    assert plain == x.numel() * 4
    assert plain / compressed == pytest.approx(m, rel=0.05)  # + v's M floats


def test_frozen_weight_saves_no_activation():
    layer = VeLoRALinear(nn.Linear(16, 8), 4)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    assert _saved_bytes(lambda: layer(x), layer) == 0
    plain = nn.Linear(16, 8).requires_grad_(False)
    assert _saved_bytes(lambda: plain(x), plain) == 0  # the same as F.linear


def _batch(seed: int, shape=(4, 5, 16), shift: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) + shift


def _unit_mean(x: torch.Tensor, m: int) -> np.ndarray:
    mean = x.double().numpy().reshape(-1, m).mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_v_is_set_by_the_first_training_batch_then_fixed():
    layer = VeLoRALinear(nn.Linear(16, 8), 4)
    layer.eval()
    layer(_batch(0))  # eval: no change
    with torch.no_grad():
        layer.train()(_batch(0))  # no grad: no change
    assert not layer.v_ready and not layer.v.any()
    layer(_batch(1))
    first = layer.v.clone()
    np.testing.assert_allclose(first.numpy(), _unit_mean(_batch(1), 4), **F32_TOL)
    layer(_batch(2, shift=-3.0))
    torch.testing.assert_close(layer.v, first, rtol=0, atol=0)


def test_running_v_moves_every_batch():
    layer = VeLoRALinear(nn.Linear(16, 8), 4, init="running", momentum=0.5)
    layer(_batch(1))
    first = layer.v.double().numpy()
    layer(_batch(2, shift=-3.0))
    step = 0.5 * first + 0.5 * _unit_mean(_batch(2, shift=-3.0), 4)
    np.testing.assert_allclose(layer.v.numpy(), step / np.linalg.norm(step), **F32_TOL)


def test_random_v_is_flora_rng_and_fixed():
    layer = VeLoRALinear(nn.Linear(16, 8), 8, init="random", seed=5, stream=2)
    expected = velora.init_v_random(5, 8, stream=2)
    np.testing.assert_array_equal(layer.v.numpy(), expected)
    layer(_batch(1))
    np.testing.assert_array_equal(layer.v.numpy(), expected)


def test_eval_mode_is_plain_linear():
    linear = nn.Linear(16, 8)
    layer = VeLoRALinear(linear, 4).eval()
    x = _batch(0)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


def test_parameters_and_state_dict_are_shared():
    linear = nn.Linear(16, 8)
    before = set(linear.state_dict())
    layer = VeLoRALinear(linear, 4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert set(layer.state_dict()) == before | {"v"}
    layer(_batch(1))
    fresh = VeLoRALinear(nn.Linear(16, 8), 4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.v_ready
    torch.testing.assert_close(fresh.v, layer.v, rtol=0, atol=0)
    old = VeLoRALinear(nn.Linear(16, 8), 4)
    old.load_state_dict(nn.Linear(16, 8).state_dict())  # a plain checkpoint, strict
    assert not old.v_ready


class Block(nn.Module):
    """A LLaMA-named toy block (q, k, v, o, up, down) for name matching."""

    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up_proj, self.down_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), dim=-1)
        h = x + self.o_proj(a @ self.v_proj(x))
        return h + self.down_proj(nn.functional.gelu(self.up_proj(h)))


class Model(nn.Module):
    def __init__(self, layers: int = 2, ckpt: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.ckpt = ckpt

    def forward(self, x):
        for block in self.layers:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
        return x


def test_apply_velora_default_targets():
    model = Model()
    names = apply_velora(model, group_size=8)
    assert names == [
        "layers.0.v_proj",
        "layers.0.down_proj",
        "layers.1.v_proj",
        "layers.1.down_proj",
    ]
    assert isinstance(model.layers[1].down_proj, VeLoRALinear)
    assert not isinstance(model.layers[0].q_proj, VeLoRALinear)
    assert apply_velora(Model(), [re.compile(r"0\.(q|k)_proj$")], 4) == [
        "layers.0.q_proj",
        "layers.0.k_proj",
    ]
    assert apply_velora(Model(), ["up"], 4) == ["layers.0.up_proj", "layers.1.up_proj"]


def test_apply_velora_errors():
    with pytest.raises(ValueError, match="No nn.Linear matched.*c_attn"):
        apply_velora(Model(), ["c_attn"], 4)
    model = Model()
    with pytest.raises(ValueError, match=r"'layers.0.v_proj'.*M=5.*D=16"):
        apply_velora(model, group_size=5)
    assert not any(isinstance(m, VeLoRALinear) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="init: 'svd'"):
        apply_velora(Model(), group_size=4, init="svd")


def _step(model, x, run=None):
    model.zero_grad()
    (model if run is None else run)(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("init", ["mean", "running"])
def test_activation_checkpointing_matches_eager(init):
    torch.manual_seed(0)
    eager = Model()
    ckpt = Model(ckpt=True)
    ckpt.load_state_dict(eager.state_dict())
    for model in (eager, ckpt):
        apply_velora(model, group_size=8, init=init, momentum=0.5)
    for seed in (1, 2):  # the second batch checks v after a recomputation
        x = _batch(seed, (2, 5, 16))
        want, got = _step(eager, x), _step(ckpt, x)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **F32_TOL)
        torch.testing.assert_close(
            ckpt.layers[0].v_proj.v, eager.layers[0].v_proj.v, rtol=0, atol=0
        )


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    eager = nn.Sequential()
    eager.add_module("up_proj", nn.Linear(16, 32))
    eager.add_module("act", nn.GELU())
    eager.add_module("down_proj", nn.Linear(32, 16))
    apply_velora(eager, group_size=8)
    _step(eager, _batch(0))  # sets v
    compiled = nn.Sequential()
    compiled.add_module("up_proj", nn.Linear(16, 32))
    compiled.add_module("act", nn.GELU())
    compiled.add_module("down_proj", VeLoRALinear(nn.Linear(32, 16), 8))
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)  # no graph break once v is set
    for seed in (1, 2):
        x = _batch(seed, (2, 5, 16))
        want, got = _step(eager, x), _step(compiled, x, run=step)
        for name in want:
            torch.testing.assert_close(got[name], want[name], **F32_TOL)


def test_cross_backend_z_and_x_hat_match_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 32)).astype(np.float32)
    v = _unit(8).astype(np.float32)
    z_np = velora.compress(x, v, 8)
    z = velora.compress(torch.from_numpy(x), torch.from_numpy(v), 8)
    x_hat = velora.reconstruct(z, torch.from_numpy(v), 8)
    np.testing.assert_allclose(z.numpy(), z_np, **F32_TOL)
    np.testing.assert_allclose(x_hat.numpy(), velora.reconstruct(z_np, v, 8), **F32_TOL)


def test_peft_lora_layers():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(target_modules=["v_proj"], r=4, lora_alpha=8)
    torch.manual_seed(0)
    plain = peft.inject_adapter_in_model(config, Model(layers=1))
    base = peft.inject_adapter_in_model(config, Model(layers=1))
    base.load_state_dict(plain.state_dict())
    nn.init.normal_(plain.layers[0].v_proj.lora_B.default.weight)
    base.load_state_dict(plain.state_dict())
    # The frozen base layer keeps no activation: VeLoRA there changes no gradient.
    assert apply_velora(base, [r"v_proj\.base_layer$"], 8) == [
        "layers.0.v_proj.base_layer"
    ]
    x = _batch(1, (2, 5, 16))
    want, got = _step(plain, x), _step(base, x)
    assert set(got) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(got[name], want[name], **F32_TOL)
    # The default targets pick LoRA's input adapter lora_A (its activation is kept).
    adapter = peft.inject_adapter_in_model(config, Model(layers=1))
    adapter.load_state_dict(plain.state_dict())
    assert apply_velora(adapter, group_size=8) == [
        "layers.0.v_proj.lora_A.default",
        "layers.0.down_proj",
    ]
    got = _step(adapter, x)
    lora_a = "layers.0.v_proj.lora_A.default.weight"
    assert not torch.allclose(got[lora_a], want[lora_a], **F32_TOL)
    torch.testing.assert_close(
        got["layers.0.v_proj.lora_B.default.weight"],
        want["layers.0.v_proj.lora_B.default.weight"],
        **F32_TOL,
    )
