"""flora_core and flora_torch on CUDA tensors (skipped without CUDA).

Not executed where this was written (no GPU). Checks the GPU claims of docs/spec.md §2
and the conformance tolerances for torch: projection bits on the device equal numpy's
(generic torch path and Triton kernels), and a FloraAdam trajectory on CUDA matches
the CPU one with TF32 off.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")

import array_api_compat.torch as xtorch  # noqa: E402
from flora_torch import FloraAdafactor, FloraAdam  # noqa: E402

from flora_core import rng  # noqa: E402


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
        matmul,
        cudnn,
    )


@pytest.mark.parametrize("draw", ["random_bits", "uniform", "rademacher", "gaussian"])
def test_core_rng_on_cuda_is_bit_identical_to_numpy(draw):
    fn = getattr(rng, draw)
    got = fn(2**40 + 1, 7, 13, (33, 301), xp=xtorch, offset=(2, 5), device="cuda")
    assert got.device.type == "cuda"
    want = fn(2**40 + 1, 7, 13, (33, 301), xp=np, offset=(2, 5))
    host = got.cpu().view(torch.int32).numpy().view(np.uint32)
    np.testing.assert_array_equal(host, want.view(np.uint32))


@pytest.mark.parametrize("optimizer", [FloraAdam, FloraAdafactor])
def test_trajectory_on_cuda_matches_cpu(optimizer):
    torch.manual_seed(0)
    cpu = torch.nn.Linear(96, 160)
    cuda = torch.nn.Linear(96, 160).cuda()
    cuda.load_state_dict(cpu.state_dict())
    opts = [optimizer(m.parameters(), lr=1e-2, rank=16, kappa=3) for m in (cpu, cuda)]
    data = torch.randn(7, 8, 96)
    for x in data:  # crosses two resample boundaries (kappa = 3)
        for model, opt, dev in ((cpu, opts[0], "cpu"), (cuda, opts[1], "cuda")):
            model(x.to(dev)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(cpu.parameters(), cuda.parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", [FloraAdam, FloraAdafactor])
def test_cuda_graph_replay_matches_eager(optimizer):
    """capturable=True: one captured step replayed across resamples == eager steps."""
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 160))
    eager = eager.cuda()
    graphed = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 160))
    graphed = graphed.cuda()
    graphed.load_state_dict(eager.state_dict())
    o_eager = optimizer(eager.parameters(), lr=1e-2, rank=16, kappa=3)
    o_graph = optimizer(
        graphed.parameters(), lr=1e-2, rank=16, kappa=3, capturable=True
    )
    data = torch.randn(10, 8, 96, device="cuda")

    def backward(model, x):  # the same .grad tensors every time (a graph input)
        model.zero_grad(set_to_none=False)
        model(x).square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in data[:3]:  # eager warm-up: state, stacks, counts
            backward(graphed, x)
            o_graph.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph.step()
    for x in data[:3]:
        backward(eager, x)
        o_eager.step()
    for x in data[3:]:  # replays cross the resamples at t = 3, 6 and 9
        backward(graphed, x)
        graph.replay()
        backward(eager, x)
        o_eager.step()
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
