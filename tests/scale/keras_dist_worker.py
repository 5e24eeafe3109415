"""flora_keras under the Keras distribution API (JAX backend, 8 CPU devices).

Run in a fresh process: ``python keras_dist_worker.py {data,model}``. Trains a small
MLP with ``FloraAdam`` under ``DataParallel`` or ``ModelParallel`` (a ``LayoutMap``
shards the kernels over the "model" axis) and prints JSON: the losses, the kernel
and state layouts, and the compression plans.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import flora_keras  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import distribution  # noqa: E402


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32)).astype("float32")
    w = rng.normal(size=(32, 4)).astype("float32")
    return x, np.tanh(x @ w).astype("float32")


def set_distribution(kind: str) -> None:
    devices = distribution.list_devices("cpu")
    if kind == "data":
        distribution.set_distribution(distribution.DataParallel(devices=devices))
        return
    mesh = distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layouts = distribution.LayoutMap(mesh)
    layouts[".*d0/kernel"] = (None, "model")  # 32 x 128: columns split
    layouts[".*d0/bias"] = ("model",)
    layouts[".*d1/kernel"] = ("model", None)  # 128 x 64: rows split
    distribution.set_distribution(
        distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")
    )


def main(kind: str) -> None:
    set_distribution(kind)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(128, activation="tanh", name="d0"),
        keras.layers.Dense(64, activation="tanh", name="d1"),
        keras.layers.Dense(4, name="d2"),
    ])  # fmt: skip
    optimizer = flora_keras.FloraAdam(learning_rate=1e-3, rank=8)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = data()
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=False)

    def layout(v) -> str:
        return str(getattr(v.value, "sharding", None).spec)

    out = {
        "loss": [float(v) for v in history.history["loss"]],
        "kernels": {w.path: layout(w) for w in model.trainable_weights},
        "states": {v.path: [list(v.shape), layout(v)] for v in optimizer.variables},
        "axes": [p.axis for p in optimizer.plans],
        "ranks": [p.rank for p in optimizer.plans],
        "devices": len(distribution.list_devices("cpu")),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
