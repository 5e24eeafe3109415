"""``import flora_keras`` without the framework of the Keras backend names the fix.

Keras 3 picks its backend at import (``KERAS_BACKEND``, else ~/.keras/keras.json,
else TensorFlow), so with only ``pip install ".[keras]"`` the import used to fail
with a bare ``No module named 'tensorflow'``. Each case runs in a fresh process that
hides one framework, whatever this process's backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDE = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == {framework!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
import flora_keras
"""


@pytest.mark.parametrize(
    ("backend", "framework", "names"),
    [
        (None, "tensorflow", "no KERAS_BACKEND set"),
        ("jax", "jax", "KERAS_BACKEND='jax'"),
    ],
    ids=["default-tensorflow", "jax"],
)
def test_missing_backend_framework_names_keras_backend(
    backend, framework, names, tmp_path
):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json (Keras writes one there)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "adapters")])
    if backend:
        env["KERAS_BACKEND"] = backend
    done = subprocess.run(
        [sys.executable, "-c", HIDE.format(framework=framework)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: flora_keras needs a Keras 3 backend"), last
    assert names in last and f"{framework!r} is not installed" in last
    assert "KERAS_BACKEND=jax or KERAS_BACKEND=torch" in last
    assert "pip install 'flora-opt-suite[keras,tensorflow]'" in last
