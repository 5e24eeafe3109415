"""FLORA-RNG v1 as one CUDA kernel for CuPy (``cupy.RawKernel``).

``draw(kind, seed, step, stream, shape, offset=...)`` returns the same words and
floats as ``flora_core.rng`` (docs/spec.md §2): one thread per Philox counter, i.e. per
row and group of four columns, grid-stride over the block. ``rng`` itself already
runs on CuPy arrays through array ops (a dozen kernel launches per round); this is
the single-launch path.

NOTE [one source, two compilers]: ``SOURCE`` is plain CUDA C++ whose only CUDA
constructs are behind ``FLORA_DEVICE`` / ``FLORA_GLOBAL`` and the ``blockIdx`` /
``blockDim`` / ``gridDim`` / ``threadIdx`` built-ins. The tests compile the very same
text with the host C++ compiler (macros as plain functions, the built-ins as globals
that a driver loop sets for every block and thread), call it with the arguments
``launch`` builds, and compare with numpy bit for bit; they also compile it with
NVRTC for sm_90 when the NVRTC library is installed. What only a GPU can check:
the CuPy launch itself and the device's bits (``tests/gpu``).

Example:
    >>> from flora_core import cupy_kernels
    >>> z = cupy_kernels.draw("gaussian", 0, 0, 1, (256, 4096))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from flora_core import rng
from flora_core._xp import MASK32

KERNEL_NAME = "flora_rng_block"
MODES = {"bits": 0, "uniform": 1, "rademacher": 2, "gaussian": 3}
THREADS = 256
MAX_BLOCKS = 65536  # grid-stride beyond this many blocks

SOURCE = r"""
#ifndef FLORA_HOST
#define FLORA_DEVICE __device__ __forceinline__
#define FLORA_GLOBAL extern "C" __global__
#endif

typedef unsigned int flora_u32;
typedef unsigned long long flora_u64;

FLORA_DEVICE flora_u32 flora_mulhi(flora_u32 a, flora_u32 b) {
    return (flora_u32)(((flora_u64)a * (flora_u64)b) >> 32);
}

/* Philox4x32-10 (Random123): x[0..3] counter in, words out; key (k0, k1). */
FLORA_DEVICE void flora_philox(flora_u32 x[4], flora_u32 k0, flora_u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        flora_u32 x0 = x[0], x2 = x[2];
        x[0] = flora_mulhi(0xCD9E8D57u, x2) ^ x[1] ^ k0;
        x[1] = 0xCD9E8D57u * x2;
        x[2] = flora_mulhi(0xD2511F53u, x0) ^ x[3] ^ k1;
        x[3] = 0xD2511F53u * x0;
    }
}

/* Block rows[row0:+rows] x columns [4 group0 + start, +cols) of (seed, step, stream).
   mode 0 writes uint32 words, 1 uniform, 2 rademacher, 3 gaussian (T[w >> 16]);
   floats are multiplied by scale (1.0f: exact). Strides are in elements. */
FLORA_GLOBAL void flora_rng_block(
    void* out, const float* table, flora_u32 k0, flora_u32 k1, flora_u32 step,
    flora_u32 stream, flora_u32 row0, flora_u32 group0, long long start,
    long long rows, long long cols, long long ngroups, long long stride_r,
    long long stride_c, int mode, float scale) {
    long long total = rows * ngroups;
    long long threads = (long long)blockDim.x * gridDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += threads) {
        long long r = t / ngroups, g = t % ngroups;
        flora_u32 x[4] = {group0 + (flora_u32)g, row0 + (flora_u32)r, step, stream};
        flora_philox(x, k0, k1);
        for (int w = 0; w < 4; ++w) {
            long long j = 4 * g + w - start;
            if (j < 0 || j >= cols) continue;
            long long at = r * stride_r + j * stride_c;
            flora_u32 word = x[w];
            if (mode == 0) {
                ((flora_u32*)out)[at] = word;
                continue;
            }
            float v;
            if (mode == 3) {
                v = table[word >> 16];
            } else if (mode == 2) {
                v = 1.0f - 2.0f * (float)(word >> 31);
            } else {
                v = (float)((word >> 8) | 1u) * 5.9604644775390625e-08f;
            }
            ((float*)out)[at] = v * scale;
        }
    }
}
"""


def launch(
    kind: str,
    seed: int,
    step: int,
    stream: int,
    shape: tuple[int, int],
    offset: tuple[int, int],
    strides: tuple[int, int],
    scale: float | None = None,
) -> tuple[tuple[int], tuple[int], tuple[Any, ...]]:
    """Grid, block and the scalar arguments (after ``out, table``) of one launch.

    Args:
        kind: ``"bits"``, ``"uniform"``, ``"rademacher"`` or ``"gaussian"``.
        seed, step, stream: as ``rng.random_bits``; shape, offset: the block.
        strides: the output's strides in elements.
        scale: multiply the floats by ``float32(scale)`` (projections).
    """
    if kind not in MODES:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {list(MODES)})")
    seed = rng.check_seed(seed)
    for name, value in (("step", step), ("stream", stream)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Invalid {name}: {value!r} (expected an int)")
        if not 0 <= value <= MASK32:
            raise ValueError(f"Invalid {name}: {value} (expected an int in [0, 2**32))")
    rows, cols = (int(s) for s in shape)
    row0, col0 = (int(o) for o in offset)
    if min(rows, cols, row0, col0) < 0:
        raise ValueError(f"Invalid block: shape={shape}, offset={offset}")
    if row0 + rows > MASK32 + 1 or (col0 + cols) >> 2 > MASK32:
        raise ValueError(f"Block {shape} at {offset} exceeds the 2**32 counter range")
    group0 = col0 >> 2
    ngroups = ((col0 + cols + 3) >> 2) - group0
    blocks = max(1, min(MAX_BLOCKS, -(-rows * ngroups // THREADS)))
    u32, i64 = np.uint32, np.int64
    args = (
        u32(seed & MASK32),
        u32(seed >> 32),
        u32(step),
        u32(stream),
        u32(row0 & MASK32),
        u32(group0),
        i64(col0 - 4 * group0),
        i64(rows),
        i64(cols),
        i64(ngroups),
        i64(strides[0]),
        i64(strides[1]),
        np.int32(MODES[kind]),
        np.float32(1.0 if scale is None else scale),
    )
    return (blocks,), (THREADS,), args


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import cupy

    return cupy.RawKernel(SOURCE, KERNEL_NAME)


_TABLES: dict[int, Any] = {}


def _table() -> Any:
    import cupy

    device = cupy.cuda.Device().id
    if device not in _TABLES:
        _TABLES[device] = cupy.asarray(rng.gaussian_table())
    return _TABLES[device]


def draw(
    kind: str,
    seed: int,
    step: int,
    stream: int,
    shape: tuple[int, int],
    *,
    offset: tuple[int, int] = (0, 0),
    scale: float | None = None,
) -> Any:
    """The block as a CuPy array on the current device (uint32 or float32)."""
    import cupy

    dtype = cupy.uint32 if kind == "bits" else cupy.float32
    out = cupy.empty(tuple(int(s) for s in shape), dtype=dtype)
    grid, block, args = launch(
        kind, seed, step, stream, shape, offset, (out.shape[1], 1), scale
    )
    if out.size:
        _kernel()(grid, block, (out, _table(), *args))
    return out
