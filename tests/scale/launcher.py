"""Launching gloo ranks for the scale tests (imported by path: no conftest clash)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, world: int, *args: str, timeout: float = 120) -> None:
    """Run ``script RANK WORLD PORT *args`` once per rank; assert all exit 0."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "adapters")]),
        "OMP_NUM_THREADS": "1",
    }
    port = str(free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), port, *args], env=env
        )  # fmt: skip
        for r in range(world)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * world, f"{script.name} ranks exited with {codes}"
