"""Array-namespace resolution and the 32-bit integer-word helpers of the RNG.

The core is written once over the Array API. ``namespace(*arrays)`` resolves the
namespace at the public boundary (numpy, CuPy, torch and JAX through
``array_api_compat``; TensorFlow through the small shim below) and helpers receive it
as ``xp=``. Nothing here imports a framework unless an array of that framework was
handed in.

NOTE [uint32 words]: Philox needs the high and low halves of a 32x32-bit product.
Every backend gets it exactly, but by a different route:
  * numpy, CuPy, TensorFlow: a uint64 product, split by shift and mask;
  * torch: its uint32 ops are incomplete, so words live in int64 tensors holding
    values in [0, 2**32) and the multiplier is split into 16-bit halves so that no
    partial product leaves int64;
  * JAX: x64 is off by default (uint64 silently becomes uint32), so both factors are
    split into 16-bit limbs and the four partial products stay in uint32.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import array_api_compat

Array = Any
Namespace = Any

MASK32 = 0xFFFFFFFF
BACKENDS = ("numpy", "torch", "jax", "tensorflow", "cupy")


def _is_tensorflow(x: object) -> bool:
    return type(x).__module__.startswith(
        ("tensorflow", "tf_keras", "keras.src.backend.tensorflow")
    )


def namespace(*arrays: Array) -> Namespace:
    """The namespace of ``arrays`` (Python scalars and None are ignored)."""
    arrays = tuple(
        a for a in arrays if a is not None and not isinstance(a, int | float)
    )
    if any(_is_tensorflow(a) for a in arrays):
        return tensorflow_namespace()
    return array_api_compat.array_namespace(*arrays)


def namespace_for(backend: str) -> Namespace:
    """The namespace of a backend named in ``BACKENDS`` (imports that framework)."""
    if backend == "tensorflow":
        return tensorflow_namespace()
    modules = {
        "numpy": "array_api_compat.numpy",
        "torch": "array_api_compat.torch",
        "cupy": "array_api_compat.cupy",
        "jax": "jax.numpy",
    }
    if backend not in modules:
        raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}")
    return importlib.import_module(modules[backend])


def backend_name(xp: Namespace) -> str:
    """Which of ``BACKENDS`` a namespace belongs to."""
    if getattr(xp, "flora_backend", None) == "tensorflow":
        return "tensorflow"
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    raise TypeError(f"Unsupported array namespace {xp!r}")


def device_of(x: Array) -> Any:
    """The device an array lives on (None for TensorFlow, which places ops itself)."""
    if _is_tensorflow(x):
        return None
    return array_api_compat.device(x)


def to_numpy(x: Array) -> Any:
    """A host numpy copy of any supported array."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.uint32"):
            import torch

            x = x.to(torch.float32 if x.dtype == torch.bfloat16 else torch.int64)
        return x.numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "numpy") and _is_tensorflow(x):
        return x.numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------
# 32-bit words
# --------------------------------------------------------------------------------------


class WordOps:
    """Exact uint32 arithmetic on one backend (see NOTE [uint32 words])."""

    def __init__(self, xp: Namespace):
        self.xp = xp
        self.backend = backend_name(xp)
        self.dtype = xp.int64 if self.backend == "torch" else xp.uint32

    def const(self, value: int, device: Any = None) -> Array:
        if self.backend in ("tensorflow", "jax"):
            return self.xp.asarray(value, dtype=self.dtype)
        return self.xp.asarray(value, dtype=self.dtype, device=device)

    def key(self, value: int, device: Any = None) -> Array | int:
        """A Philox key word for an xor: a plain int on torch (a scalar operand, no
        host-to-device copy, so a CUDA graph can capture the rounds)."""
        if self.backend == "torch":
            return value
        return self.const(value, device)

    def arange(self, start: int, stop: int, device: Any = None) -> Array:
        xp = self.xp
        if self.backend == "tensorflow":
            return xp.astype(xp.arange(start, stop, dtype=xp.int64), self.dtype)
        if self.backend == "jax":
            return xp.arange(start, stop, dtype=self.dtype)
        return xp.arange(start, stop, dtype=self.dtype, device=device)

    def from_any(self, x: Array | int, device: Any = None) -> Array:
        """An int or integer array as words (values are taken mod 2**32)."""
        if isinstance(x, int):
            return self.const(x & MASK32, device)
        xp = self.xp
        if not hasattr(x, "shape"):  # a numpy scalar
            x = xp.asarray(x)
        if self.backend == "torch":
            return xp.bitwise_and(xp.astype(x, xp.int64), MASK32)
        return xp.astype(x, self.dtype)

    def to_uint32(self, w: Array) -> Array:
        if self.backend == "torch":
            import torch

            return w.to(torch.uint32)
        return w

    def mulhilo(self, a: Array, multiplier: int) -> tuple[Array, Array]:
        """(hi, lo) 32-bit halves of ``a * multiplier``, exactly."""
        xp = self.xp
        m_hi, m_lo = multiplier >> 16, multiplier & 0xFFFF
        if self.backend == "torch":
            # Native operators: array_api_compat's wrappers cost ~5x on these ops.
            p_lo = a * m_lo
            p_hi = a * m_hi
            s = p_lo + ((p_hi & 0xFFFF) << 16)
            return (p_hi >> 16) + (s >> 32), s & MASK32
        if self.backend == "jax":
            c16 = xp.asarray(16, dtype=xp.uint32)
            c_mask = xp.asarray(0xFFFF, dtype=xp.uint32)
            a_lo = xp.bitwise_and(a, c_mask)
            a_hi = xp.bitwise_right_shift(a, c16)
            ll = a_lo * xp.asarray(m_lo, dtype=xp.uint32)
            lh = a_lo * xp.asarray(m_hi, dtype=xp.uint32)
            hl = a_hi * xp.asarray(m_lo, dtype=xp.uint32)
            hh = a_hi * xp.asarray(m_hi, dtype=xp.uint32)
            mid = (
                xp.bitwise_right_shift(ll, c16)
                + xp.bitwise_and(lh, c_mask)
                + xp.bitwise_and(hl, c_mask)
            )
            hi = (
                hh
                + xp.bitwise_right_shift(lh, c16)
                + xp.bitwise_right_shift(hl, c16)
                + xp.bitwise_right_shift(mid, c16)
            )
            return hi, a * xp.asarray(multiplier, dtype=xp.uint32)
        wide = xp.astype(a, xp.uint64) * xp.asarray(multiplier, dtype=xp.uint64)
        hi = xp.astype(
            xp.bitwise_right_shift(wide, xp.asarray(32, dtype=xp.uint64)), xp.uint32
        )
        lo = xp.astype(
            xp.bitwise_and(wide, xp.asarray(MASK32, dtype=xp.uint64)), xp.uint32
        )
        return hi, lo

    def xor(self, a: Array, b: Array) -> Array:
        if self.backend == "torch":
            return a ^ b
        return self.xp.bitwise_xor(a, b)

    def shift_right(self, a: Array, bits: int) -> Array:
        if self.backend == "torch":
            return a >> bits
        return self.xp.bitwise_right_shift(a, self.xp.asarray(bits, dtype=self.dtype))

    def as_index(self, w: Array) -> Array:
        """Words as a gather index (TensorFlow gathers with int32/int64 only)."""
        if self.backend == "tensorflow":
            return self.xp.astype(w, self.xp.int32)
        return w


@functools.cache
def _word_ops_cached(xp: Namespace) -> WordOps:
    return WordOps(xp)


def word_ops(xp: Namespace) -> WordOps:
    return _word_ops_cached(xp)


# --------------------------------------------------------------------------------------
# TensorFlow
# --------------------------------------------------------------------------------------


class _TensorFlowNamespace:
    """The Array API subset the core uses, on TensorFlow ops.

    TensorFlow has no Array API namespace; ``tf.experimental.numpy`` is close but
    differs in names and casting. Only what ``flora_core`` calls is defined; anything
    else falls through to ``tf.experimental.numpy``.
    """

    flora_backend = "tensorflow"

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf
        for name in (
            "bool",
            "float16",
            "bfloat16",
            "float32",
            "float64",
            "int32",
            "int64",
            "uint32",
            "uint64",
        ):
            setattr(self, name, getattr(tf, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tf.experimental.numpy, name)

    def _like(self, x: Any, other: Any) -> Any:
        if isinstance(other, self.tf.Tensor | self.tf.Variable):
            return other
        return self.tf.constant(other, dtype=x.dtype)

    def asarray(
        self, x: Any, dtype: Any = None, device: Any = None, copy: Any = None
    ) -> Any:
        tf = self.tf
        if isinstance(x, tf.Tensor | tf.Variable):
            return x if dtype is None or x.dtype == dtype else tf.cast(x, dtype)
        return tf.constant(x, dtype=dtype)

    def astype(self, x: Any, dtype: Any, copy: bool = True) -> Any:
        return self.tf.cast(x, dtype)

    def bitwise_xor(self, a: Any, b: Any) -> Any:
        return self.tf.bitwise.bitwise_xor(a, self._like(a, b))

    def bitwise_and(self, a: Any, b: Any) -> Any:
        return self.tf.bitwise.bitwise_and(a, self._like(a, b))

    def bitwise_right_shift(self, a: Any, b: Any) -> Any:
        return self.tf.bitwise.right_shift(a, self._like(a, b))

    def bitwise_left_shift(self, a: Any, b: Any) -> Any:
        return self.tf.bitwise.left_shift(a, self._like(a, b))

    def arange(
        self,
        start: int,
        stop: int | None = None,
        step: int = 1,
        dtype: Any = None,
        device: Any = None,
    ) -> Any:
        return self.tf.range(start, stop, step, dtype=dtype or self.tf.int64)

    def zeros(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self.tf.zeros(shape, dtype=dtype or self.tf.float32)

    def ones(self, shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return self.tf.ones(shape, dtype=dtype or self.tf.float32)

    def reshape(self, x: Any, shape: Any, copy: Any = None) -> Any:
        return self.tf.reshape(x, shape)

    def broadcast_to(self, x: Any, shape: Any) -> Any:
        return self.tf.broadcast_to(x, shape)

    def stack(self, arrays: Any, axis: int = 0) -> Any:
        return self.tf.stack(list(arrays), axis=axis)

    def take(self, x: Any, indices: Any, axis: int | None = None) -> Any:
        return self.tf.gather(x, indices, axis=axis or 0)

    def matmul(self, a: Any, b: Any) -> Any:
        return self.tf.linalg.matmul(a, b)

    def matrix_transpose(self, x: Any) -> Any:
        return self.tf.linalg.matrix_transpose(x)

    def mean(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self.tf.reduce_mean(x, axis=axis, keepdims=keepdims)

    def sum(
        self, x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None
    ) -> Any:
        return self.tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self.tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def sqrt(self, x: Any) -> Any:
        return self.tf.sqrt(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.tf.where(cond, a, b)

    def maximum(self, a: Any, b: Any) -> Any:
        return self.tf.maximum(a, self._like(a, b))

    def minimum(self, a: Any, b: Any) -> Any:
        return self.tf.minimum(a, self._like(a, b))

    def expand_dims(self, x: Any, axis: int = 0) -> Any:
        return self.tf.expand_dims(x, axis)

    def pow(self, a: Any, b: Any) -> Any:
        return self.tf.pow(a, self._like(a, b))

    def zeros_like(self, x: Any, dtype: Any = None) -> Any:
        return self.tf.zeros_like(x, dtype=dtype)

    def isdtype(self, dtype: Any, kind: str) -> bool:
        if kind == "real floating":
            return bool(dtype.is_floating)
        if kind == "complex floating":
            return bool(dtype.is_complex)
        if kind == "integral":
            return bool(dtype.is_integer)
        raise ValueError(f"Unsupported dtype kind {kind!r}")


@functools.lru_cache(maxsize=1)
def tensorflow_namespace() -> Namespace:
    return _TensorFlowNamespace()
