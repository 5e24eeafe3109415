"""The CuPy kernel's CUDA source, compiled for the host, against numpy bit for bit.

NOTE [one source, two compilers] (``flora_core/cupy_kernels.py``): the exact text of
``cupy_kernels.SOURCE`` is compiled by the system C++ compiler with its CUDA
constructs defined away, and a driver runs every (block, thread) of the grid that
``cupy_kernels.launch`` computes, with the arguments it builds. A second test
compiles the same text with NVRTC (the CUDA runtime compiler CuPy uses) for sm_90
when ``libnvrtc`` is installed (``pip install nvidia-cuda-nvrtc``). Neither needs a
GPU; the device's bits are checked by ``test_cupy_device`` where CuPy and CUDA are.
"""

from __future__ import annotations

import ctypes
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flora_core import cupy_kernels, rng

PRELUDE = r"""
#define FLORA_HOST
#define FLORA_DEVICE static inline
#define FLORA_GLOBAL static
struct flora_dim3 { unsigned int x, y, z; };
static flora_dim3 blockIdx, threadIdx, blockDim, gridDim;
"""
DRIVER = r"""
extern "C" void flora_launch(
    unsigned int grid, unsigned int block, void* out, const float* table,
    flora_u32 k0, flora_u32 k1, flora_u32 step, flora_u32 stream, flora_u32 row0,
    flora_u32 group0, long long start, long long rows, long long cols,
    long long ngroups, long long stride_r, long long stride_c, int mode, float scale) {
    gridDim.x = grid; blockDim.x = block;
    gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx.x = b; threadIdx.x = t;
            flora_rng_block(out, table, k0, k1, step, stream, row0, group0, start,
                            rows, cols, ngroups, stride_r, stride_c, mode, scale);
        }
    }
}
"""
CTYPES = {
    np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64,
    np.int32: ctypes.c_int32,
    np.float32: ctypes.c_float,
}
NUMPY_DRAWS = {
    "bits": rng.random_bits,
    "uniform": rng.uniform,
    "rademacher": rng.rademacher,
    "gaussian": rng.gaussian,
}


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("cupy_source")
    source = folder / "kernel.cpp"
    source.write_text(PRELUDE + cupy_kernels.SOURCE + DRIVER)
    library = folder / "kernel.so"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-Wall",
            "-Werror",
            "-shared",
            "-fPIC",
            "-o",
            str(library),
            str(source),
        ],
        check=True,
    )
    return ctypes.CDLL(str(library)).flora_launch


def run_host(
    host_kernel, kind, seed, step, stream, shape, offset, out=None, scale=None
):
    dtype = np.uint32 if kind == "bits" else np.float32
    out = np.zeros(shape, dtype) if out is None else out
    strides = tuple(s // out.itemsize for s in out.strides)
    (grid,), (block,), args = cupy_kernels.launch(
        kind, seed, step, stream, shape, offset, strides, scale
    )
    table = np.ascontiguousarray(rng.gaussian_table())
    c_args = [CTYPES[type(a)](a.item()) for a in args]
    host_kernel(
        ctypes.c_uint(grid),
        ctypes.c_uint(block),
        out.ctypes.data_as(ctypes.c_void_p),
        table.ctypes.data_as(ctypes.c_void_p),
        *c_args,
    )
    return out


def test_golden_rows(host_kernel):
    got = run_host(host_kernel, "bits", 0, 0, 0, (2, 8), (0, 0))
    assert " ".join(f"{w:08x}" for w in got[1]) == (
        "6ad0c5ec ea236249 73a459f5 074944b3 6da11836 e4c29d23 fc0d53ee 645d5243"
    )


@pytest.mark.parametrize("kind", list(NUMPY_DRAWS))
@pytest.mark.parametrize(
    "shape,offset",
    [
        ((1, 1), (0, 0)),
        ((5, 37), (3, 2)),
        ((40, 130), (7, 1)),
        ((2, 40), (2**32 - 2, 2**34 - 44)),
    ],  # ends at the top of both counter ranges
)
def test_bit_identical_to_numpy(host_kernel, kind, shape, offset):
    seed, step, stream = 2**64 - 3, 2**32 - 1, 0x1234567
    got = run_host(host_kernel, kind, seed, step, stream, shape, offset)
    want = NUMPY_DRAWS[kind](seed, step, stream, shape, xp=np, offset=offset)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_grid_stride_and_strided_output(host_kernel, monkeypatch):
    monkeypatch.setattr(cupy_kernels, "MAX_BLOCKS", 2)  # 2 x 256 threads, 600 counters
    base = np.full((300, 60), -1.0, np.float32)
    view = base[::3, 5:45:2]  # 100 x 20, strides (180, 2) elements
    run_host(host_kernel, "gaussian", 9, 8, 7, (100, 20), (4, 3), out=view)
    want = rng.gaussian(9, 8, 7, (100, 20), xp=np, offset=(4, 3))
    np.testing.assert_array_equal(view.view(np.uint32), want.view(np.uint32))
    untouched = np.ones(base.shape, bool)
    untouched[::3, 5:45:2] = False
    assert (base[untouched] == -1.0).all()


def test_projection_scale_is_the_cores(host_kernel):
    from flora_core import policy
    from flora_core import projection as proj

    plan = policy.plan((48, 96), 2, rank=12, seed=5)
    got = run_host(
        host_kernel,
        "gaussian",
        plan.seed,
        3,
        plan.stream(1),
        (plan.rank, plan.dim),
        (0, 0),
        scale=1 / np.sqrt(plan.rank),
    )
    want = proj.projection(plan, 3, 1, xp=np)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_launch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Invalid kind"):
        cupy_kernels.launch("normal", 0, 0, 0, (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="Invalid stream"):
        cupy_kernels.launch("bits", 0, 0, 2**32, (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="counter range"):
        cupy_kernels.launch("bits", 0, 0, 0, (2, 1), (2**32 - 1, 0), (1, 1))


def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc from a pip wheel (its builtins library loaded first), or the system's."""
    roots = [Path(p) for p in sys.path if p.endswith("site-packages")]
    for lib in (f for r in roots for f in glob.glob(str(r / "nvidia/*/lib"))):
        builtins = sorted(glob.glob(f"{lib}/libnvrtc-builtins.so.*"))
        names = [n for n in glob.glob(f"{lib}/libnvrtc.so.*") if ".alt." not in n]
        if builtins and names:
            ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)  # dlopen-ed by nvrtc
            return ctypes.CDLL(names[0])
    try:
        return ctypes.CDLL("libnvrtc.so")
    except OSError:
        return None


def test_source_compiles_with_nvrtc_for_sm90():
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not installed (pip install nvidia-cuda-nvrtc)")
    program = ctypes.c_void_p()
    source = cupy_kernels.SOURCE.encode()
    assert (
        nvrtc.nvrtcCreateProgram(
            ctypes.byref(program), source, b"flora.cu", 0, None, None
        )
        == 0
    )
    options = (ctypes.c_char_p * 1)(b"--gpu-architecture=compute_90")
    status = nvrtc.nvrtcCompileProgram(program, 1, options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    assert nvrtc.nvrtcGetPTX(program, ptx) == 0
    assert f".entry {cupy_kernels.KERNEL_NAME}".encode() in ptx.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
