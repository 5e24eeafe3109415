"""The Triton FLORA-RNG kernels against ``flora_core.rng`` on numpy, bit for bit.

Without CUDA the kernels run in Triton's CPU interpreter: this module sets
``TRITON_INTERPRET=1`` before it imports them (harmless in a process without CUDA,
where no Triton kernel could run compiled anyway). With CUDA the same tests run the
compiled kernels on the GPU. Skipped when ``triton`` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    # NOTE: Triton decorates its own library kernels (tl.philox) when it is imported,
    # so the interpreter must be chosen before the first `import triton`.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 could be set; "
            "run this file in its own process",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

import array_api_compat.numpy as xnp  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from flora_torch import triton_compress, triton_rng  # noqa: E402

from conformance.known_answers import GOLDEN_ROWS, KATS  # noqa: E402
from flora_core import policy, rng  # noqa: E402
from flora_core import projection as proj  # noqa: E402

DEVICE = "cpu" if triton_rng.interpreted() else "cuda"
VECTORS = Path(__file__).parents[2] / "conformance" / "vectors" / "rng.json"
NUMPY_DRAWS = {
    "bits": rng.random_bits,
    "uniform": rng.uniform,
    "rademacher": rng.rademacher,
    "gaussian": rng.gaussian,
}


def host_bits(x: torch.Tensor) -> np.ndarray:
    """The raw 32-bit patterns of a uint32 or float32 tensor."""
    return x.cpu().view(torch.int32).numpy().view(np.uint32)


@triton.jit
def _philox_kernel(out_ptr, seed, x0, x1, x2, x3):
    words = triton_rng.philox_tile(
        seed, x2, x3, tl.arange(0, 1) + x1, tl.arange(0, 1) + x0
    )
    tl.store(out_ptr + tl.arange(0, 4)[None, :], words.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_known_answers(counter, key, expected):
    seed = key[0] | key[1] << 32
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    _philox_kernel[(1,)](out, seed, *counter)
    assert host_bits(out).tolist() == list(expected)
    # counter (x0, x1, x2, x3) is element (row x1, cols 4 x0 ..) of step x2, stream x3
    x0, x1, x2, x3 = counter
    if x0 < 0xFFFFFFFF:  # the top counter group is outside the block API's range
        got = triton_rng.random_bits(
            seed, x2, x3, (1, 4), offset=(x1, 4 * x0), device=DEVICE
        )
        assert got.dtype == torch.uint32
        assert host_bits(got)[0].tolist() == list(expected)


def test_golden_rows():
    got = host_bits(triton_rng.random_bits(0, 0, 0, (2, 8), device=DEVICE))
    assert [" ".join(f"{w:08x}" for w in row) for row in got] == GOLDEN_ROWS


def test_committed_vectors():
    for case in json.loads(VECTORS.read_text()):
        got = triton_rng.random_bits(
            case["seed"],
            case["step"],
            case["stream"],
            tuple(case["shape"]),
            offset=tuple(case["offset"]),
            device=DEVICE,
        )
        want = [[int(w, 16) for w in row] for row in case["words"]]
        np.testing.assert_array_equal(host_bits(got), np.array(want, np.uint32))


@pytest.mark.parametrize("trial", range(4))
def test_unaligned_block_equals_slice_of_full_matrix(trial):
    rs = np.random.default_rng(trial)
    rows, cols = int(rs.integers(1, 20)), int(rs.integers(1, 600))
    seed, step, stream = (
        int(rs.integers(0, 2**64, dtype=np.uint64)),
        int(rs.integers(0, 2**32)),
        int(rs.integers(0, 2**32)),
    )
    full = host_bits(
        triton_rng.random_bits(seed, step, stream, (rows + 9, cols + 13), device=DEVICE)
    )
    r0, c0 = int(rs.integers(0, 10)), int(rs.integers(1, 14)) | 1  # odd: unaligned
    h, w = int(rs.integers(1, rows + 1)), int(rs.integers(1, cols + 1))
    block = triton_rng.random_bits(
        seed, step, stream, (h, w), offset=(r0, c0), device=DEVICE
    )
    np.testing.assert_array_equal(host_bits(block), full[r0 : r0 + h, c0 : c0 + w])
    np.testing.assert_array_equal(
        full, rng.random_bits(seed, step, stream, full.shape, xp=np)
    )


@pytest.mark.parametrize("kind", list(NUMPY_DRAWS))
@pytest.mark.parametrize(
    "shape,offset",
    [
        ((1, 1), (0, 0)),
        ((7, 513), (3, 2)),
        ((9, 515), (0, 1)),
        ((17, 3), (5, 6)),
        ((2, 40), (2**32 - 2, 2**34 - 44)),
    ],  # ends at the top of both counter ranges
)
def test_bit_identical_to_numpy(kind, shape, offset):
    # shapes straddle BLOCK_ROWS = 8 and 4 * BLOCK_GROUPS = 512 columns
    seed, step, stream = 2**64 - 3, 2**32 - 1, 0x1234567
    got = triton_rng.draw(kind, seed, step, stream, shape, offset=offset, device=DEVICE)
    want = NUMPY_DRAWS[kind](seed, step, stream, shape, xp=np, offset=offset)
    assert tuple(got.shape) == shape
    assert got.dtype == (torch.uint32 if kind == "bits" else torch.float32)
    np.testing.assert_array_equal(host_bits(got), want.view(np.uint32))


def test_writes_into_strided_out():
    out = torch.full((12, 40), -1.0, device=DEVICE)
    view = out[2:9, 3:33:2]  # 7 x 15, column stride 2
    triton_rng.draw("gaussian", 5, 6, 7, (7, 15), offset=(1, 3), out=view)
    want = rng.gaussian(5, 6, 7, (7, 15), xp=np, offset=(1, 3))
    np.testing.assert_array_equal(host_bits(view.contiguous()), want.view(np.uint32))
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[2:9, 3:33:2] = False
    assert bool((out[untouched] == -1.0).all())


def test_empty_block_and_bad_arguments():
    assert triton_rng.gaussian(0, 0, 0, (0, 5), device=DEVICE).shape == (0, 5)
    with pytest.raises(ValueError, match="Invalid step"):
        triton_rng.gaussian(0, 2**32, 0, (1, 1), device=DEVICE)
    with pytest.raises(ValueError, match="Invalid seed"):
        triton_rng.gaussian(-1, 0, 0, (1, 1), device=DEVICE)
    with pytest.raises(ValueError, match="counter range"):
        triton_rng.gaussian(0, 0, 0, (2, 1), offset=(2**32 - 1, 0), device=DEVICE)
    with pytest.raises(ValueError, match="Invalid kind"):
        triton_rng.draw("normal", 0, 0, 0, (1, 1), device=DEVICE)
    with pytest.raises(ValueError, match="Invalid device"):
        triton_rng.gaussian(0, 0, 0, (1, 1), device="meta")


PLANS = {  # (shape, axis, rank, distribution): both axes, both distributions
    "last-gaussian": ((40, 70), 1, 9, "gaussian"),
    "first-rademacher": ((70, 40), 0, 9, "rademacher"),
    "first-auto-gaussian": ((33, 130), None, 20, "gaussian"),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_projection_bit_identical_to_core(case):
    shape, axis, rank, dist = PLANS[case]
    plan = policy.plan(
        shape, 3, rank=rank, seed=2**40 + 7, axis=axis, distribution=dist
    )
    got = triton_rng.projection(plan, 5, 1, device=DEVICE)
    want = proj.projection(plan, 5, 1, xp=xnp)
    np.testing.assert_array_equal(host_bits(got), want.view(np.uint32))
    shard = triton_rng.projection(plan, 5, 1, device=DEVICE, cols=(3, 17))
    np.testing.assert_array_equal(host_bits(shard), want[:, 3:17].view(np.uint32))


@pytest.mark.parametrize("case", list(PLANS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_compress_and_decompress_match_core(case, dtype):
    shape, axis, rank, dist = PLANS[case]
    plan = policy.plan(shape, 3, rank=rank, seed=11, axis=axis, distribution=dist)
    g = torch.randn(plan.matrix_shape, generator=torch.Generator().manual_seed(0))
    g = g.to(getattr(torch, dtype))
    g_host = g.float().numpy()
    a = proj.projection(plan, 2, 0, xp=xnp)
    want_c = proj.compress(g_host, a, plan.axis, xp=xnp)
    got_c = triton_compress.compress(g.to(DEVICE), plan, 2, 0).cpu().numpy()
    assert got_c.shape == plan.state_shape and got_c.dtype == np.float32
    # fp32 accumulation in another order: |err| <= ~d ulp of the largest partial sum
    scale = np.abs(g_host).max() * np.abs(a).max() * plan.dim
    np.testing.assert_allclose(got_c, want_c, rtol=0, atol=8 * scale * 2**-24)
    want_g = proj.decompress(want_c, a, plan.axis, xp=xnp)
    got_g = triton_compress.decompress(torch.from_numpy(want_c).to(DEVICE), plan, 2, 0)
    assert tuple(got_g.shape) == plan.matrix_shape
    scale = np.abs(want_c).max() * np.abs(a).max() * plan.rank
    np.testing.assert_allclose(
        got_g.cpu().numpy(), want_g, rtol=0, atol=8 * scale * 2**-24
    )


def test_fused_compress_rejects_bad_inputs():
    plan = policy.plan((40, 70), 0, rank=9)
    with pytest.raises(ValueError, match="Invalid compress input"):
        triton_compress.compress(torch.zeros(70, 40, device=DEVICE), plan, 0, 0)
    identity = policy.plan((40, 70), 0, rank=9, distribution="identity")
    with pytest.raises(ValueError, match="random projection"):
        triton_compress.compress(torch.zeros(40, 70, device=DEVICE), identity, 0, 0)
    with pytest.raises(ValueError, match="Invalid decompress input"):
        triton_compress.decompress(torch.zeros(40, 9, device=DEVICE), plan, 0, 0)


@pytest.mark.parametrize("projection", ["gaussian", "rademacher"])
def test_triton_dispatch_gives_the_same_flora_adam_trajectory(projection):
    # bench_gpu.triton_dispatch routes flora_core.rng draws to the kernel: the
    # prototype of the wiring must leave a trajectory bit for bit unchanged.
    from flora_torch import FloraAdam

    spec = importlib.util.spec_from_file_location(
        "bench_gpu", Path(__file__).parents[2] / "benchmarks" / "bench_gpu.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    original = triton_rng.draw

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    results = []
    for routed in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 70, device=DEVICE)
        opt = FloraAdam(
            model.parameters(), lr=1e-2, rank=8, kappa=2, projection=projection
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_rng, "draw", counted)
            with bench.triton_dispatch(DEVICE) if routed else nullcontext():
                for x in torch.randn(
                    3, 4, 40, generator=torch.Generator().manual_seed(1)
                ):
                    model(x.to(DEVICE)).square().mean().backward()
                    opt.step()
                    opt.zero_grad()
        results.append([p.detach().cpu().clone() for p in model.parameters()])
    assert calls and set(calls) == {projection}  # the kernel did draw, when routed
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
