"""Flora for Keras 3: sublinear-memory optimizers on the TensorFlow, JAX and torch backends.

Change one word of a Keras program::

    model.compile(optimizer=flora_keras.FloraAdam(), loss=...)

and the momentum of every weight matrix is kept as a random projection of rank
``r`` (FLORA), with optional compressed gradient accumulation. The update rules are
``flora_core``'s, so the numbers equal flora_torch's and flora_optax's.

Classes:
    FloraAdam        Adam / AdamW with a compressed first moment (``factored=True``
                     also factors the second moment).
    FloraAdafactor   ``optax.adafactor(momentum=...)`` with a compressed momentum.

Functions:
    export_state / import_state   the portable flora_core state (format 2) of a
                                  built optimizer, in memory or in a file (moves
                                  between frameworks).
    state_header                  what gives that state its meaning.
"""

import os

try:
    import keras  # noqa: F401  (reads KERAS_BACKEND and imports that framework)
except ModuleNotFoundError as error:
    if error.name not in ("tensorflow", "jax", "torch"):
        raise
    _backend = os.environ.get("KERAS_BACKEND")
    _which = (
        f"KERAS_BACKEND={_backend!r}"
        if _backend
        else "no KERAS_BACKEND set, so Keras' default, TensorFlow (or the backend in "
        "~/.keras/keras.json)"
    )
    raise ImportError(
        f"flora_keras needs a Keras 3 backend: {_which}, but {error.name!r} is not "
        "installed. Set KERAS_BACKEND=jax or KERAS_BACKEND=torch (with that framework "
        "installed) before Python imports keras, or install TensorFlow: "
        "pip install 'flora-opt-suite[keras,tensorflow]'."
    ) from error

from flora_keras.adafactor import FloraAdafactor
from flora_keras.adam import FloraAdam
from flora_keras.checkpoint import export_state, import_state, state_header

__all__ = [
    "FloraAdafactor",
    "FloraAdam",
    "export_state",
    "import_state",
    "state_header",
]
