"""The CuPy kernel on a GPU against numpy, bit for bit (skipped without CuPy + CUDA).

Not executed where this was written (no GPU); ``test_cupy_source.py`` checks the same
CUDA source on the host.
"""

from __future__ import annotations

import numpy as np
import pytest

from flora_core import cupy_kernels, rng

cupy = pytest.importorskip("cupy")
try:
    HAS_DEVICE = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001 - no driver, no device
    HAS_DEVICE = False
pytestmark = pytest.mark.skipif(not HAS_DEVICE, reason="no CUDA device for CuPy")
NUMPY_DRAWS = {
    "bits": rng.random_bits,
    "uniform": rng.uniform,
    "rademacher": rng.rademacher,
    "gaussian": rng.gaussian,
}


@pytest.mark.parametrize("kind", list(NUMPY_DRAWS))
@pytest.mark.parametrize("shape,offset", [((3, 5), (0, 0)), ((300, 1029), (7, 3))])
def test_raw_kernel_bit_identical_to_numpy(kind, shape, offset):
    got = cupy.asnumpy(cupy_kernels.draw(kind, 2**63 + 5, 17, 9, shape, offset=offset))
    want = NUMPY_DRAWS[kind](2**63 + 5, 17, 9, shape, xp=np, offset=offset)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_core_on_cupy_arrays_matches_raw_kernel():
    import array_api_compat.cupy as xcp

    core = cupy.asnumpy(rng.gaussian(3, 4, 5, (64, 200), xp=xcp))
    fast = cupy.asnumpy(cupy_kernels.draw("gaussian", 3, 4, 5, (64, 200)))
    np.testing.assert_array_equal(core.view(np.uint32), fast.view(np.uint32))
