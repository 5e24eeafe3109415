"""State files: atomic writes, bounded reads and fault injection (docs/spec.md §5.5)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conformance import faults
from flora_core import state, state_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target():
    # a seed above 2**63: uint64 survives both containers and the JSON header
    return faults.sample_state(seed=2**63 + 5)


@pytest.mark.parametrize("suffix", state_files.SUFFIXES)
def test_round_trip(tmp_path, target, suffix):
    flat, plans, header = target
    path = tmp_path / f"s{suffix}"
    state_files.save_state(flat, path)
    back = state_files.load_state(path, like=flat)
    assert back.keys() == flat.keys()
    for key, value in flat.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)
    state.import_state(back, plans, header)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_safetensors_files_load_in_the_safetensors_package(tmp_path, target):
    if importlib.util.find_spec("safetensors") is None:
        pytest.skip("safetensors is not installed in this session")
    from safetensors.numpy import load_file

    flat, _, _ = target
    state_files.save_state(flat, tmp_path / "s.safetensors")
    back = load_file(str(tmp_path / "s.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in flat.items())


def test_no_fault_is_silently_accepted(tmp_path, target):
    """16 truncations and 200 single-bit flips of each container, and crafted files:
    each is refused, or (a flip in bytes that carry nothing) loads identical."""
    flat, plans, header = target
    seen = []
    counts = faults.tally(flat, plans, header, tmp_path,
                          lambda f, r: seen.append((f, r)))  # fmt: skip
    altered = [f"{f.kind} {f.container} {f.detail}" for f, r in seen if r == "altered"]
    assert not altered, altered
    for key, count in counts.items():
        if not key.startswith("flip"):  # truncated and crafted files carry no state
            assert set(count) == {"refused"}, (key, count)
    assert sum(c["refused"] for c in counts.values()) >= 400, counts
    crafted = len(list(faults.crafted(flat)))
    assert len(seen) == 2 * (faults.TRUNCATIONS + faults.FLIPS) + crafted


def test_like_refuses_other_shapes_before_reading(tmp_path, target):
    flat, _, _ = target
    path = tmp_path / "s.npz"
    state_files.save_state(flat, path)
    other = dict(flat, **{"param.0.mu": np.zeros((40, 8), np.float32)})
    with pytest.raises(
        ValueError, match=r"param.0.mu: file <f4 \(40, 4\), optimizer <f4 \(40, 8\)"
    ):
        state_files.load_state(path, like=other)
    with pytest.raises(ValueError, match="more than max_bytes=100"):
        state_files.load_state(path, max_bytes=100)


def test_unknown_keys_and_types_are_refused_when_saving(tmp_path):
    with pytest.raises(ValueError, match="not a portable-state key"):
        state_files.save_state({"evil": np.zeros(2)}, tmp_path / "s.npz")
    with pytest.raises(ValueError, match="use .npz or .safetensors"):
        state_files.save_state({}, tmp_path / "s.pt")


KILLED_SAVE = """
import sys, time
sys.path[:0] = [{root!r}]
import numpy as np
from flora_core import state_files

def slow_savez(f, **arrays):  # write part of the file, then hang: killed mid-save
    f.write(b"PK" + b"\\0" * 4096)
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

state_files.np.savez = slow_savez
state_files.save_state({{"flora.format_version": np.asarray(2)}}, {path!r})
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_process_killed_mid_save_leaves_the_previous_file_whole(tmp_path, target):
    flat, plans, header = target
    path = tmp_path / "ckpt.npz"
    state_files.save_state(flat, path)
    before = path.read_bytes()
    script = KILLED_SAVE.format(root=str(ROOT), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert path.read_bytes() == before
    state.import_state(state_files.load_state(path, like=flat), plans, header)
