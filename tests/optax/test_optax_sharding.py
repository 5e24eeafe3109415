"""Sharded params (8 host CPU devices, NamedSharding): run in a subprocess so the
rest of the suite keeps its single device (XLA_FLAGS is read when jax starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sharded_update.py")
ROOT = Path(__file__).resolve().parents[2]


def test_sharded_update_keeps_sharding_and_equals_unsharded() -> None:
    path = os.pathsep.join(
        [str(ROOT), str(ROOT / "adapters"), os.environ.get("PYTHONPATH", "")]
    )
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [
        "OK", "flora_adam", "OK", "flora_multi_steps",
    ]  # fmt: skip
