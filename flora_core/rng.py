"""FLORA-RNG v1: Philox4x32-10 in plain array ops, identical bits on every backend.

Element ``(r, c)`` of a logical ``R x C`` matrix for ``(seed, step, stream)`` is word
``c & 3`` of ``philox4x32_10(counter=(c >> 2, r, step, stream), key=(seed_lo, seed_hi))``.
Any block is computed from its own counters alone, so a shard of a projection can be
generated without the rest (docs/spec.md §2, normative).

Only integer ops and gathers lie between the counters and the floats, so the floats
are bit-identical on numpy, torch, JAX, TensorFlow and CuPy, on CPU and GPU.

Example:
    >>> import numpy as np
    >>> from flora_core import rng
    >>> bits = rng.random_bits(0, 0, 0, (1, 4), xp=np)
    >>> [f"{int(w):08x}" for w in bits[0]]
    ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']

References:
    Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from flora_core import _xp
from flora_core._xp import MASK32, Array, Namespace

RNG_VERSION = 1
PHILOX_M0 = 0xD2511F53
PHILOX_M2 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
GAUSSIAN_TABLE_SHA256 = (
    "1cfbba1e07e34386a57626f82aeb43e6ed54ba70a3ea6b7d964dc66a841074a8"
)
UINT64_MAX = 2**64 - 1


def check_seed(seed: object) -> int:
    """``seed`` as a uint64 Python int, or a ValueError naming it."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"Invalid seed: {seed!r} (expected an int in [0, 2**64))")
    if not 0 <= int(seed) <= UINT64_MAX:
        raise ValueError(f"Invalid seed: {seed} (expected an int in [0, 2**64))")
    return int(seed)


def _check_word(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        return  # an array or numpy scalar (possibly traced): taken mod 2**32
    if not 0 <= int(value) <= MASK32:
        raise ValueError(f"Invalid {name}: {value} (expected an int in [0, 2**32))")


def _philox_words(
    x: list[Array], k0: int, k1: int, ops: _xp.WordOps, device: Any
) -> list[Array]:
    """Ten Philox4x32 rounds on backend words (see NOTE [uint32 words])."""
    if ops.backend == "jax":
        return _philox_words_jax(x, k0, k1, ops)
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        x = _philox_round(x, ops.key(k0, device), ops.key(k1, device), ops)
    return x


def _philox_round(
    x: list[Array], k0: Array, k1: Array, ops: _xp.WordOps
) -> list[Array]:
    x0, x1, x2, x3 = x
    hi0, lo0 = ops.mulhilo(x0, PHILOX_M0)
    hi2, lo2 = ops.mulhilo(x2, PHILOX_M2)
    return [ops.xor(ops.xor(hi2, x1), k0), lo2, ops.xor(ops.xor(hi0, x3), k1), lo0]


def _philox_words_jax(
    x: list[Array], k0: int, k1: int, ops: _xp.WordOps
) -> list[Array]:
    """The ten rounds as a ``lax.fori_loop``, bit-identical to the unrolled ones.

    NOTE [philox loop]: unrolled under ``jax.jit``, the rounds of one projection
    make a fusion of ~300 integer ops that XLA's CPU backend takes ~1 s to compile,
    i.e. minutes for a model with a hundred compressed matrices; as a loop the body
    compiles once and runs as fast. The body is a module-level function with the keys
    in the carry, so eager calls hit JAX's cache instead of recompiling a new closure.
    """
    import jax.numpy as jnp
    from jax import lax

    carry = (*x, jnp.uint32(k0), jnp.uint32(k1))
    return list(lax.fori_loop(0, PHILOX_ROUNDS, _philox_body_jax, carry)[:4])


def _philox_body_jax(i: Array, carry: tuple[Array, ...]) -> tuple[Array, ...]:
    """One round; round ``i`` uses keys ``k + i*W`` (mod 2**32, in uint32)."""
    import jax.numpy as jnp

    *words, k0, k1 = carry
    step = i.astype(jnp.uint32)
    key0 = k0 + step * jnp.uint32(PHILOX_W0)
    key1 = k1 + step * jnp.uint32(PHILOX_W1)
    ops = _xp.word_ops(jnp)
    return (*_philox_round(words, key0, key1, ops), k0, k1)


def philox4x32(
    counter: Sequence[Array | int],
    key: Sequence[int],
    *,
    xp: Namespace,
    device: Any = None,
) -> tuple[Array, Array, Array, Array]:
    """Philox4x32-10 of Random123, elementwise over broadcastable counter words.

    Args:
        counter: four uint32 words (arrays or ints), broadcast against each other.
        key: two ints ``(k0, k1)`` in ``[0, 2**32)``.
        xp: the array namespace to compute in.
        device: where to place constants (torch / CuPy).

    Returns:
        The four output words as uint32 arrays of the broadcast shape.
    """
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(
            f"philox4x32 takes 4 counter words and 2 key words, got {counter}, {key}"
        )
    for k in key:
        _check_word("key word", k)
    ops = _xp.word_ops(xp)
    words = [ops.from_any(c, device) for c in counter]
    shape = _broadcast_shape([tuple(getattr(w, "shape", ())) for w in words])
    words = [xp.broadcast_to(w, shape) for w in words]
    out = _philox_words(words, int(key[0]), int(key[1]), ops, device)
    return tuple(ops.to_uint32(w) for w in out)  # type: ignore[return-value]


def _broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*shapes))


Streams = int | Sequence[int]


def _streams(stream: Streams) -> int | tuple[int, ...]:
    """An int stream, or a tuple of int streams (one block per stream, stacked)."""
    if isinstance(stream, int) and not isinstance(stream, bool):
        _check_word("stream", stream)
        return stream
    if isinstance(stream, np.integer):
        return _streams(int(stream))
    streams = (
        tuple(stream)
        if isinstance(stream, tuple | list)
        else tuple(int(s) for s in np.asarray(stream).reshape(-1))
    )
    for s in streams:
        _check_word("stream", s)
    return streams


def _block_words(
    seed: int,
    step: Array | int,
    stream: Streams,
    shape: tuple[int, int],
    offset: tuple[int, int],
    xp: Namespace,
    device: Any,
) -> Array:
    """Backend words of the block ``rows[offset[0]:+shape[0]] x cols[offset[1]:+shape[1]]``.

    With a sequence of streams the blocks of every stream are stacked along a new
    leading axis (NOTE [stacked streams]).
    """
    seed = check_seed(seed)
    _check_word("step", step)
    stream = _streams(stream)
    rows, cols = (int(s) for s in shape)
    row0, col0 = (int(o) for o in offset)
    if rows < 0 or cols < 0 or row0 < 0 or col0 < 0:
        raise ValueError(f"Invalid block: shape={shape}, offset={offset}")
    if row0 + rows > MASK32 + 1 or (col0 + cols) >> 2 > MASK32:
        raise ValueError(f"Block {shape} at {offset} exceeds the 2**32 counter range")
    group0, group1 = col0 >> 2, (col0 + cols + 3) >> 2
    ngroups = group1 - group0
    if _xp.backend_name(xp) == "numpy" and (
        isinstance(step, int) or np.ndim(step) == 0
    ):
        words = _numpy_block_words(
            seed, int(step) & MASK32, stream, rows, row0, group0, ngroups
        )
    else:
        words = _generic_block_words(
            seed, step, stream, rows, row0, group0, ngroups, xp, device
        )
    start = col0 - 4 * group0
    if start == 0 and cols == 4 * ngroups:
        return words
    return words[..., start : start + cols]


def _generic_block_words(
    seed: int,
    step: Array | int,
    stream: int | tuple[int, ...],
    rows: int,
    row0: int,
    group0: int,
    ngroups: int,
    xp: Namespace,
    device: Any,
) -> Array:
    """Words of column groups ``group0..+ngroups`` of rows ``row0..+rows``, any backend.

    NOTE [stacked streams]: a tuple of ``B`` streams is one more counter word array,
    ``x3`` of shape ``(B, 1, 1)``, broadcast against the ``(rows, groups)`` grid: the
    ``B`` blocks come out of one Philox evaluation, stacked on a leading axis, each
    bit-identical to its own single-stream block.
    """
    ops = _xp.word_ops(xp)
    batch = () if isinstance(stream, int) else (len(stream),)
    grid = (*batch, rows, ngroups)
    groups = xp.reshape(ops.arange(group0, group0 + ngroups, device), (1, ngroups))
    x0 = xp.broadcast_to(groups, grid)
    x1 = xp.broadcast_to(
        xp.reshape(ops.arange(row0, row0 + rows, device), (rows, 1)), grid
    )
    x2 = xp.broadcast_to(ops.from_any(step, device), grid)
    if isinstance(stream, int):
        x3 = xp.broadcast_to(ops.from_any(stream, device), grid)
    else:
        x3 = xp.broadcast_to(_stream_words(stream, xp, device), grid)
    out = _philox_words([x0, x1, x2, x3], seed & MASK32, seed >> 32, ops, device)
    return xp.reshape(xp.stack(out, axis=-1), (*batch, rows, 4 * ngroups))


_STREAM_WORDS: dict[tuple[str, str, tuple[int, ...]], Array] = {}


def device_streams(streams: Sequence[int], xp: Namespace, device: Any = None) -> Array:
    """The stacked-stream counter word on a device, made now (it is cached): call it
    before a traced or captured step so that the step only reads it."""
    return _stream_words(tuple(int(s) for s in streams), xp, device)


def _stream_words(streams: tuple[int, ...], xp: Namespace, device: Any) -> Array:
    """The ``(B, 1, 1)`` counter word ``x3`` of stacked streams, made once per device.

    Cached like the gaussian table: a CUDA graph or a compiled step then reads a
    tensor that already lives on the device instead of copying a host list each call.
    """
    backend = _xp.backend_name(xp)
    ops = _xp.word_ops(xp)
    host = np.asarray(streams, dtype=np.int64).reshape(-1, 1, 1)
    if backend == "tensorflow":
        return xp.asarray(host.astype(np.uint32))
    key = (backend, str(device), streams)
    words = _STREAM_WORDS.get(key)
    if words is None:
        if backend == "jax":
            import jax

            with jax.ensure_compile_time_eval():
                words = xp.asarray(host.astype(np.uint32))
        else:
            words = ops.from_any(xp.asarray(host, device=device), device)
        _STREAM_WORDS[key] = words
    return words


NUMPY_CHUNK = 8192  # counters per chunk: six uint64 buffers of 64 KiB stay in cache


def _numpy_block_words(
    seed: int,
    step: int,
    stream: int | tuple[int, ...],
    rows: int,
    row0: int,
    group0: int,
    ngroups: int,
) -> np.ndarray:
    """The same words as ``_generic_block_words`` on numpy, chunked and in place.

    A performance path (about twice the generic speed): uint64 words throughout, so a
    product needs no casts, and buffers reused per chunk. A test checks it against
    the generic path bit for bit. Stacked streams run as one flat counter range.
    """
    streams = np.asarray(stream, dtype=np.uint64).reshape(-1)
    batch = () if isinstance(stream, int) else (len(streams),)
    per_stream = rows * ngroups
    total = per_stream * len(streams)
    out = np.empty((total, 4), dtype=np.uint32)
    m0, m2, mask, s32 = (np.uint64(v) for v in (PHILOX_M0, PHILOX_M2, MASK32, 32))
    for start in range(0, total, NUMPY_CHUNK):
        index = np.arange(start, min(start + NUMPY_CHUNK, total), dtype=np.uint64)
        x0 = index % np.uint64(ngroups) + np.uint64(group0)
        x1 = index // np.uint64(ngroups) % np.uint64(rows) + np.uint64(row0)
        x2 = np.full_like(index, step)
        if batch:
            x3 = streams[(index // np.uint64(per_stream)).astype(np.intp)]
        else:
            x3 = np.full_like(index, streams[0])
        p0, p2 = np.empty_like(index), np.empty_like(index)
        k0, k1 = seed & MASK32, seed >> 32
        for round_index in range(PHILOX_ROUNDS):
            if round_index:
                k0 = (k0 + PHILOX_W0) & MASK32
                k1 = (k1 + PHILOX_W1) & MASK32
            np.multiply(x0, m0, out=p0)
            np.multiply(x2, m2, out=p2)
            np.right_shift(p2, s32, out=x0)
            x0 ^= x1
            x0 ^= np.uint64(k0)
            np.right_shift(p0, s32, out=x2)
            x2 ^= x3
            x2 ^= np.uint64(k1)
            np.bitwise_and(p2, mask, out=x1)
            np.bitwise_and(p0, mask, out=x3)
        block = out[start : start + len(index)]
        for j, x in enumerate((x0, x1, x2, x3)):
            block[:, j] = x
    return out.reshape(*batch, rows, 4 * ngroups)


def _on_host_numpy(xp: Namespace, step: Array | int, device: Any) -> bool:
    """Whether a torch call can take the numpy path (same bits, ~3x faster on CPU).

    True for eager torch on the CPU with a host step; CUDA and ``torch.compile`` keep
    the native torch path.
    """
    if _xp.backend_name(xp) != "torch":
        return False
    import torch

    if torch.compiler.is_compiling():
        return False
    target = torch.device(device) if device is not None else torch.get_default_device()
    if target.type != "cpu":
        return False
    return isinstance(step, int) or (
        isinstance(step, torch.Tensor) and step.device.type == "cpu" and step.ndim == 0
    )


def _via_numpy(draw: Any, seed: int, step: Array | int, stream: Streams, shape: tuple[int, int],
               offset: tuple[int, int]) -> Array:  # fmt: skip
    import torch

    return torch.from_numpy(
        draw(seed, int(step) & MASK32, stream, shape, xp=np, offset=offset)
    )


def random_bits(
    seed: int,
    step: Array | int,
    stream: Streams,
    shape: tuple[int, int],
    *,
    xp: Namespace,
    offset: tuple[int, int] = (0, 0),
    device: Any = None,
) -> Array:
    """The FLORA-RNG v1 uint32 words of a block of the logical matrix.

    Args:
        seed: uint64 seed (a Python int).
        step: uint32 resample or cycle index; an int or an integer array (may be traced).
        stream: uint32 stream id, ``(param_index << 2) | role``; or a sequence of
            ``B`` of them, which stacks their blocks into ``(B, rows, cols)``.
        shape: ``(rows, cols)`` of the block.
        xp: the array namespace to compute in.
        offset: ``(row, col)`` of the block's first element in the logical matrix.
        device: the torch / CuPy device for the result.

    Returns:
        A uint32 array of ``shape``, or ``(B, *shape)`` for ``B`` streams
        (``torch.uint32`` on torch).
    """
    if _on_host_numpy(xp, step, device):
        return _via_numpy(random_bits, seed, step, stream, shape, offset)
    words = _block_words(seed, step, stream, shape, offset, xp, device)
    return _xp.word_ops(xp).to_uint32(words)


def uniform(
    seed: int,
    step: Array | int,
    stream: Streams,
    shape: tuple[int, int],
    *,
    xp: Namespace,
    offset: tuple[int, int] = (0, 0),
    device: Any = None,
) -> Array:
    """float32 in (0, 1): ``float32((w >> 8) | 1) * 2**-24``."""
    if _on_host_numpy(xp, step, device):
        return _via_numpy(uniform, seed, step, stream, shape, offset)
    ops = _xp.word_ops(xp)
    words = _block_words(seed, step, stream, shape, offset, xp, device)
    mantissa = xp.bitwise_or(ops.shift_right(words, 8), ops.const(1, device))
    return xp.astype(mantissa, xp.float32) * (2.0**-24)


def rademacher(
    seed: int,
    step: Array | int,
    stream: Streams,
    shape: tuple[int, int],
    *,
    xp: Namespace,
    offset: tuple[int, int] = (0, 0),
    device: Any = None,
) -> Array:
    """float32 signs: ``1 - 2 * (w >> 31)``."""
    if _on_host_numpy(xp, step, device):
        return _via_numpy(rademacher, seed, step, stream, shape, offset)
    ops = _xp.word_ops(xp)
    words = _block_words(seed, step, stream, shape, offset, xp, device)
    return 1.0 - 2.0 * xp.astype(ops.shift_right(words, 31), xp.float32)


def gaussian(
    seed: int,
    step: Array | int,
    stream: Streams,
    shape: tuple[int, int],
    *,
    xp: Namespace,
    offset: tuple[int, int] = (0, 0),
    device: Any = None,
) -> Array:
    """float32 standard normals by table lookup: ``T[w >> 16]`` (see ``gaussian_table``)."""
    if _on_host_numpy(xp, step, device):
        return _via_numpy(gaussian, seed, step, stream, shape, offset)
    ops = _xp.word_ops(xp)
    words = _block_words(seed, step, stream, shape, offset, xp, device)
    index = ops.as_index(xp.reshape(ops.shift_right(words, 16), (-1,)))
    table = _table_in(xp, device)
    return xp.reshape(xp.take(table, index, axis=0), tuple(words.shape))


@functools.lru_cache(maxsize=1)
def gaussian_table() -> np.ndarray:
    """``T[i] = float32(Φ⁻¹((i + 0.5) / 65536))`` for i in 0..65535, read-only.

    NOTE [gaussian table]: inv_cdf in float64 then one rounding to float32 gives the
    correctly rounded table; a lookup is exact on every backend, where ``erfinv`` or
    Box-Muller would differ by ulps between numpy, torch, XLA and TensorFlow.
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    table = np.array(
        [inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32
    )
    digest = hashlib.sha256(table.astype("<f4").tobytes()).hexdigest()
    if digest != GAUSSIAN_TABLE_SHA256:  # pragma: no cover - a broken libm
        raise RuntimeError(f"gaussian table hash mismatch: {digest}")
    table.setflags(write=False)
    return table


_TABLES: dict[tuple[str, str], Array] = {}


def device_table(xp: Namespace, device: Any = None) -> Array:
    """The gaussian table on a device, made now (it is cached): call it before a
    traced or captured step so that the step only reads it."""
    return _table_in(xp, device)


def _table_in(xp: Namespace, device: Any) -> Array:
    backend = _xp.backend_name(xp)
    if backend == "tensorflow":  # graph-mode constants must not outlive their graph
        return xp.asarray(gaussian_table())
    key = (backend, str(device))
    table = _TABLES.get(key)
    if table is None:
        host = np.array(gaussian_table())
        if backend == "jax":  # concrete even when first reached inside jax.jit
            import jax

            with jax.ensure_compile_time_eval():
                table = xp.asarray(host)
        else:
            table = xp.asarray(host, device=device)
        _TABLES[key] = table
    return table
