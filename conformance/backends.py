"""The backend a conformance run uses, picked by ``FLORA_BACKEND`` (default numpy)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flora_core import _xp


@dataclass(frozen=True)
class Backend:
    """A namespace plus host <-> backend conversion and the backend's compiler."""

    name: str
    xp: Any

    def asarray(self, x: Any) -> Any:
        if self.name == "torch":
            import torch

            return torch.from_numpy(np.array(x))
        if self.name == "tensorflow":
            import tensorflow as tf

            return tf.constant(np.asarray(x))
        return self.xp.asarray(np.asarray(x))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(_xp.to_numpy(x))

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` under the backend's compiler (array arguments only)."""
        if self.name == "jax":
            import jax

            return jax.jit(fn)
        if self.name == "torch":
            import torch

            return torch.compile(fn, dynamic=False, fullgraph=False)
        if self.name == "tensorflow":
            import tensorflow as tf

            return tf.function(fn, jit_compile=True)
        return fn


def current() -> Backend:
    name = os.environ.get("FLORA_BACKEND", "numpy")
    return Backend(name, _xp.namespace_for(name))
