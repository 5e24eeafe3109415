"""``import flora_core`` loads no framework."""

from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_framework():
    code = (
        "import sys, flora_core, flora_core.velora\n"
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'cupy') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
