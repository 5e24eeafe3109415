"""FLORA-RNG v1 as Triton kernels: any block of a projection, on CUDA torch tensors.

Element ``(r, c)`` of a logical ``R x C`` matrix for ``(seed, step, stream)`` is word
``c & 3`` of ``philox4x32_10(counter=(c >> 2, r, step, stream), key=(seed_lo,
seed_hi))`` (docs/spec.md §2, normative); the floats are ``T[w >> 16]`` (gaussian),
``1 - 2 (w >> 31)`` (rademacher) and ``float32((w >> 8) | 1) 2**-24`` (uniform).
Integer ops and one gather only, so the values are bit-identical to
``flora_core.rng`` on numpy.

NOTE [triton philox layout]: ``tl.philox(seed, c0, c1, c2, c3, 10)`` on uint32
counters is Random123's Philox4x32-10 with exactly the spec's layout: ``c0..c3`` are
the counter words ``x0..x3``, the key is ``(seed & 0xFFFFFFFF, seed >> 32)``, round
constants ``0xD2511F53`` (word 0) and ``0xCD9E8D57`` (word 2), key bumps ``0x9E3779B9``
and ``0xBB67AE85``. Checked against the spec's known answers (docs/spec.md §2) in interpreter mode
(``tests/gpu/test_triton_interpret.py``). Counters must be uint32 before the call:
an int64 counter silently selects Triton's Philox4x64 variant.

One program covers ``BLOCK_ROWS`` rows and ``BLOCK_GROUPS`` counters per row, i.e.
``4 * BLOCK_GROUPS`` columns: one Philox call yields the four words of a counter,
interleaved with ``tl.join`` into consecutive columns. Blocks need not be aligned:
columns outside ``[col0, col0 + cols)`` are computed and masked out.

Runs on CUDA devices, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported (Triton's interpreter; slow, used by the tests).

Example:
    >>> import torch
    >>> from flora_torch import triton_rng
    >>> z = triton_rng.gaussian(0, 0, 1, (256, 4096), device="cuda")  # doctest: +SKIP
    >>> z.dtype, z.shape  # doctest: +SKIP
    (torch.float32, torch.Size([256, 4096]))

References:
    Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from flora_core import rng
from flora_core._xp import MASK32
from flora_core.policy import CompressionPlan

WORDS, UNIFORM, RADEMACHER, GAUSSIAN = 0, 1, 2, 3
MODES = {
    "bits": WORDS,
    "uniform": UNIFORM,
    "rademacher": RADEMACHER,
    "gaussian": GAUSSIAN,
}
BLOCK_ROWS = 8
BLOCK_GROUPS = 128  # 512 columns: 4096 elements per program


def interpreted() -> bool:
    """Whether these kernels run in Triton's CPU interpreter.

    Decided when this module was imported (``TRITON_INTERPRET=1`` then), as Triton
    decides it when it decorates a kernel.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_block_kernel, InterpretedFunction)


@triton.jit
def philox_tile(seed, step, stream, rows, groups):
    """Words of rows ``rows`` x counters ``groups``: shape ``(R, 4 G)``, uint32.

    ``rows`` and ``groups`` are integer vectors (any int dtype, taken mod 2**32).
    """
    zero = tl.zeros((rows.shape[0], groups.shape[0]), dtype=tl.int32)
    c0 = (zero + groups[None, :]).to(tl.uint32)
    c1 = (zero + rows[:, None]).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + stream).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, 10)  # NOTE [triton philox layout]
    # join(join(w0, w2), join(w1, w3))[..., i, j] is word 2 i + j: w0 w1 w2 w3
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(words, (rows.shape[0], 4 * groups.shape[0]))


@triton.jit
def words_to_values(words, table_ptr, MODE: tl.constexpr):
    """The spec's integer-only maps from uint32 words to float32 (or int32 bits)."""
    if MODE == 3:  # gaussian: T[w >> 16]
        return tl.load(table_ptr + (words >> 16).to(tl.int32))
    elif MODE == 2:  # rademacher: 1 - 2 (w >> 31)
        return 1.0 - 2.0 * (words >> 31).to(tl.float32)
    elif MODE == 1:  # uniform: float32((w >> 8) | 1) * 2**-24
        return ((words >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08
    else:
        return words.to(tl.int32, bitcast=True)


@triton.jit(do_not_specialize=["seed", "step", "stream", "row0", "group0", "start"])
def _block_kernel(
    out_ptr, table_ptr, seed, step, stream, row0, group0, start, rows, cols,
    num_group_blocks, stride_r, stride_c, scale,
    MODE: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # 1-D grid: no 65535 limit on either dimension
    pid_r = pid // num_group_blocks
    pid_g = pid % num_group_blocks
    r_local = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    g_local = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    words = philox_tile(seed, step, stream, row0 + r_local, group0 + g_local)
    values = words_to_values(words, table_ptr, MODE)
    if SCALED:
        values = values * scale
    j = pid_g * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G) - start  # output column
    mask = (r_local[:, None] < rows) & (j[None, :] >= 0) & (j[None, :] < cols)
    offsets = (
        r_local[:, None].to(tl.int64) * stride_r + j[None, :].to(tl.int64) * stride_c
    )
    tl.store(out_ptr + offsets, values, mask=mask)


def _check_word(name: str, value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value.item()) & MASK32  # a device sync; optimizers pass ints
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (expected an int in [0, 2**32))")
    if not 0 <= value <= MASK32:
        raise ValueError(f"Invalid {name}: {value} (expected an int in [0, 2**32))")
    return value


def resolve_device(device: Any) -> torch.device:
    """``device`` checked against the mode: CUDA, or CPU under the interpreter."""
    if device is None:
        device = "cpu" if interpreted() else "cuda"
    device = torch.device(device)
    wanted = "cpu" if interpreted() else "cuda"
    if device.type != wanted:
        raise ValueError(
            f"Invalid device: {device} (triton_rng runs on {wanted} here"
            + (
                "; set TRITON_INTERPRET=1 before importing triton to run on CPU)"
                if wanted == "cuda"
                else ")"
            )
        )
    return device


_TABLES: dict[torch.device, torch.Tensor] = {}


def table_on(device: torch.device) -> torch.Tensor:
    """The gaussian table ``rng.gaussian_table()`` as a float32 tensor on ``device``."""
    table = _TABLES.get(device)
    if table is None:
        table = torch.from_numpy(rng.gaussian_table().copy()).to(device)
        _TABLES[device] = table
    return table


def draw(
    kind: str,
    seed: int,
    step: int | torch.Tensor,
    stream: int | tuple[int, ...],
    shape: tuple[int, int],
    *,
    offset: tuple[int, int] = (0, 0),
    device: Any = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block ``rows[offset[0]:+shape[0]] x cols[offset[1]:+shape[1]]`` of ``kind``.

    Args:
        kind: ``"bits"`` (uint32), ``"uniform"``, ``"rademacher"`` or ``"gaussian"``.
        seed, step, stream: as ``flora_core.rng.random_bits`` (ints; a one-element
            tensor ``step`` is read back to the host). A tuple of streams stacks
            their blocks into ``(B, *shape)`` (one launch per stream).
        shape: ``(rows, cols)`` of the block; offset: its first ``(row, col)``.
        device: a CUDA device (default ``"cuda"``; CPU under the interpreter).
        scale: multiply the floats by ``float32(scale)`` in the kernel (projections).
        out: write into this 2-D tensor (any strides) instead of a new one.

    Returns:
        A ``shape`` tensor: ``torch.uint32`` for bits, else ``torch.float32``.
    """
    if kind not in MODES:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {list(MODES)})")
    if isinstance(stream, tuple | list):  # stacked streams: one block per stream
        blocks = torch.empty(
            (len(stream), *shape), device=resolve_device(device),
            dtype=torch.int32 if kind == "bits" else torch.float32,
        )  # fmt: skip
        for block, one in zip(blocks, stream, strict=True):
            draw(kind, seed, step, one, shape, offset=offset, scale=scale, out=block)
        return blocks.view(torch.uint32) if kind == "bits" else blocks
    seed = rng.check_seed(seed)
    step = _check_word("step", step)
    stream = _check_word("stream", stream)
    rows, cols = (int(s) for s in shape)
    row0, col0 = (int(o) for o in offset)
    if min(rows, cols, row0, col0) < 0:
        raise ValueError(f"Invalid block: shape={shape}, offset={offset}")
    if row0 + rows > MASK32 + 1 or (col0 + cols) >> 2 > MASK32:
        raise ValueError(f"Block {shape} at {offset} exceeds the 2**32 counter range")
    if scale is not None and kind == "bits":
        raise ValueError("scale applies to floats, not to kind='bits'")
    device = resolve_device(out.device if out is not None else device)
    dtype = torch.int32 if kind == "bits" else torch.float32
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=device)
    elif out.shape != (rows, cols) or out.dtype not in (dtype, torch.uint32):
        raise ValueError(
            f"Invalid out: {tuple(out.shape)} {out.dtype}, expected {(rows, cols)} "
            f"{'uint32' if kind == 'bits' else 'float32'}"
        )
    target = out.view(torch.int32) if out.dtype == torch.uint32 else out
    if rows and cols:
        group0 = col0 >> 2
        ngroups = ((col0 + cols + 3) >> 2) - group0
        num_g = triton.cdiv(ngroups, BLOCK_GROUPS)
        grid = (triton.cdiv(rows, BLOCK_ROWS) * num_g,)
        _block_kernel[grid](
            target, table_on(device), seed, step, stream, row0, group0,
            col0 - 4 * group0, rows, cols, num_g, target.stride(0), target.stride(1),
            1.0 if scale is None else float(scale), MODE=MODES[kind],
            SCALED=scale is not None, BLOCK_R=BLOCK_ROWS, BLOCK_G=BLOCK_GROUPS,
        )  # fmt: skip
    return target.view(torch.uint32) if kind == "bits" else out


def random_bits(seed: int, step: int | torch.Tensor, stream: int, shape: tuple[int, int],
        *, offset: tuple[int, int] = (0, 0), device: Any = None) -> torch.Tensor:  # fmt: skip
    """uint32 words of a block (``flora_core.rng.random_bits`` on CUDA)."""
    return draw("bits", seed, step, stream, shape, offset=offset, device=device)


def uniform(seed: int, step: int | torch.Tensor, stream: int, shape: tuple[int, int],
        *, offset: tuple[int, int] = (0, 0), device: Any = None) -> torch.Tensor:  # fmt: skip
    """float32 in (0, 1) (``flora_core.rng.uniform`` on CUDA)."""
    return draw("uniform", seed, step, stream, shape, offset=offset, device=device)


def rademacher(seed: int, step: int | torch.Tensor, stream: int, shape: tuple[int, int],
        *, offset: tuple[int, int] = (0, 0), device: Any = None) -> torch.Tensor:  # fmt: skip
    """float32 signs (``flora_core.rng.rademacher`` on CUDA)."""
    return draw("rademacher", seed, step, stream, shape, offset=offset, device=device)


def gaussian(seed: int, step: int | torch.Tensor, stream: int, shape: tuple[int, int],
        *, offset: tuple[int, int] = (0, 0), device: Any = None) -> torch.Tensor:  # fmt: skip
    """float32 table normals (``flora_core.rng.gaussian`` on CUDA)."""
    return draw("gaussian", seed, step, stream, shape, offset=offset, device=device)


def projection(
    plan: CompressionPlan,
    index: int | torch.Tensor,
    role: int,
    *,
    device: Any = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """``flora_core.projection.projection`` in one kernel: ``z * float32(1/sqrt(r))``.

    Bit-identical to the core's ``A``: the scale is the same float32 and the product
    one correctly rounded multiply (NOTE [projection scale]).
    """
    if plan.distribution == "identity" or plan.rank is None:
        return None
    start, stop = (0, plan.dim) if cols is None else cols
    return draw(
        plan.distribution,
        plan.seed,
        index,
        plan.stream(role),
        (plan.rank, stop - start),
        offset=(0, start),
        device=device,
        scale=1.0 / math.sqrt(plan.rank),
    )
