"""Helpers shared by the flora_keras tests (the Keras backend is this process's)."""

from __future__ import annotations

import keras
import numpy as np

BACKEND = keras.backend.backend()


def linear_loss(y_true, y_pred):
    """Per-sample ``sum(y_pred * y_true)``: for ``y = x W`` the gradient is ``xᵀT/B``."""
    return keras.ops.sum(y_pred * y_true, axis=-1)


def mlp(
    inputs: int = 40, hidden: int = 48, outputs: int = 4, seed: int = 0
) -> keras.Model:
    """Dense(hidden) -> Dense(outputs): one compressible kernel, biases, a thin head."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(outputs),
        ]
    )


def data(samples: int = 32, inputs: int = 40, outputs: int = 4, seed: int = 1):
    rs = np.random.default_rng(seed)
    x = rs.standard_normal((samples, inputs)).astype("float32")
    y = rs.standard_normal((samples, outputs)).astype("float32")
    return x, y


def weights(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables]


def slot(optimizer, variable, name: str):
    """The optimizer variable ``name`` (``mu``, ``nu``, ``acc``...) of ``variable``."""
    return optimizer._slots[optimizer._get_variable_index(variable)][name]


def nbytes(variables) -> int:
    return sum(
        int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
        for v in variables
    )
