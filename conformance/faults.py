"""Fault injection on state files: every way a file can be damaged, and its outcome.

A fault is a damaged copy of a good state file. Loading it the way an adapter does
(``state_files.load_state(path, like=...)`` then ``state.import_state``) has one of
three outcomes:

* ``refused``: an error names the problem (what must happen);
* ``unchanged``: it loads and every array equals the original (the damage hit bytes
  that carry nothing: zip timestamps, header padding) — harmless;
* ``altered``: it loads with different values — a silent acceptance, which must
  never happen.

Used by ``tests/core/test_state_files.py`` (which asserts no ``altered``) and
``benchmarks/fault_injection.py`` (more seeds, the torch adapter and torch's own
container; writes ``benchmarks/results/fault_injection.{json,md}``).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora_core import policy, rules, state, state_files

TRUNCATIONS = 16
FLIPS = 200


@dataclass(frozen=True)
class Fault:
    kind: str  # "truncation", "flip", "crafted"
    container: str  # ".npz", ".safetensors" (or another file type: ".pt")
    detail: str
    data: bytes


def good_file(flat: Mapping[str, Any], suffix: str, workdir: Path) -> bytes:
    path = workdir / f"good{suffix}"
    state_files.save_state(flat, path)
    return path.read_bytes()


def faults(flat: Mapping[str, Any], workdir: Path, seed: int = 0) -> Iterator[Fault]:
    """Truncations, random single-bit flips and crafted files of both containers."""
    rs = np.random.default_rng(seed)
    for suffix in state_files.SUFFIXES:
        yield from damaged(good_file(flat, suffix, workdir), suffix, rs)
    yield from crafted(flat)


def sample_state(seed: int) -> tuple[dict[str, Any], list[Any], state.Header]:
    """A FloraAdafactor state of three parameters (matrix, vector, conv kernel) in
    the portable flat form, with its plans and header: what the faults damage."""
    config = rules.AdafactorConfig(kappa=5)
    shapes = ((40, 24), (24,), (8, 3, 3, 3))
    plans = [policy.plan(s, i, rank=4, seed=seed) for i, s in enumerate(shapes)]
    rs = np.random.default_rng(0)
    states = []
    for plan in plans:
        init = rules.flora_adafactor_init(plan, config, xp=np)
        fields = {k: np.abs(rs.standard_normal(np.shape(v))).astype(np.float32)
                  for k, v in init.items() if k != "count"}  # fmt: skip
        states.append({**fields, "count": 12})
    header = state.Header.of("adafactor", config, names=("w", "b", "conv"))
    return state.export_state(plans, states, header), plans, header


def damaged(data: bytes, container: str, rs: np.random.Generator) -> Iterator[Fault]:
    """:data:`TRUNCATIONS` evenly spaced truncations and :data:`FLIPS` random
    single-bit flips of the file ``data`` (any container)."""
    for cut in np.linspace(0, len(data), TRUNCATIONS, endpoint=False, dtype=int):
        yield Fault("truncation", container, f"first {cut} of {len(data)} bytes",
                    data[:cut])  # fmt: skip
    for _ in range(FLIPS):
        where, bit = int(rs.integers(len(data))), int(rs.integers(8))
        flipped = bytearray(data)
        flipped[where] ^= 1 << bit
        yield Fault("flip", container, f"byte {where} bit {bit}", bytes(flipped))


def _npz(members: Mapping[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, payload in members.items():
            archive.writestr(name + ".npy", payload)
    return buffer.getvalue()


def _npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    payload = buffer.getvalue()
    if shape is None:
        return payload
    header = (
        f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    )
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def crafted(flat: Mapping[str, Any]) -> Iterator[Fault]:
    """Files built to break a naive reader (each must be refused)."""
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    good = {k: _npy(v) for k, v in arrays.items()}
    yield Fault(
        "crafted",
        ".npz",
        "an .npy header declaring 2**36 floats (339 bytes)",
        _npz({**good, "param.0.mu": _npy(np.zeros(1, np.float32), (2**36,))}),
    )
    bomb = {**good, "param.0.mu": _npy(np.zeros((4096, 4096), np.float32))}
    yield Fault("crafted", ".npz", "a deflated member (a zip bomb)", _npz(bomb, True))
    yield Fault(
        "crafted",
        ".npz",
        "an unknown key",
        _npz({**good, "extra.evil": _npy(np.zeros(4, np.float32))}),
    )
    broken = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,, }".ljust(118)
    yield Fault(
        "crafted",
        ".npz",
        "an .npy header that is not a Python literal",
        _npz({**good, "param.0.mu": b"\x93NUMPY\x01\x00"
              + struct.pack("<H", 119) + broken.encode() + b"\n"}),
    )  # fmt: skip
    pickled = io.BytesIO()
    np.lib.format.write_array(
        pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True
    )
    yield Fault(
        "crafted",
        ".npz",
        "an object (pickled) member",
        _npz({**good, "param.0.mu": pickled.getvalue()}),
    )
    yield Fault(
        "crafted",
        ".safetensors",
        "offsets past the end of the file",
        _safetensors(
            {
                "param.0.mu": {
                    "dtype": "F32",
                    "shape": [2**20],
                    "data_offsets": [0, 2**22],
                }
            }
        ),
    )
    yield Fault(
        "crafted",
        ".safetensors",
        "a header length larger than the file",
        struct.pack("<Q", 2**40) + b"{}",
    )
    yield Fault("crafted", ".safetensors", "a header that is not JSON",
                struct.pack("<Q", 8) + b"not json")  # fmt: skip


def _safetensors(header: dict[str, Any]) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * 16


def judge(
    fault: Fault, load: Callable[[Path], Any], workdir: Path
) -> tuple[str, BaseException | None]:
    """Write ``fault`` to a file, ``load`` it; ``("refused", error)`` if that raises,
    else ``(outcome of the loaded value, None)``: ``load`` returns True for
    ``unchanged``, False for ``altered``. Any exception counts as a refusal here;
    :func:`error_name` tells a named ``ValueError`` from a crash."""
    path = workdir / f"fault{fault.container}"
    path.write_bytes(fault.data)
    try:
        same = load(path)
    except Exception as error:
        return "refused", error
    finally:
        os.unlink(path)
    return ("unchanged" if same else "altered"), None


def error_name(error: BaseException) -> str:
    """The exception's type and the gist of its message (no path, no numbers)."""
    text = str(error).split("\n")[0]
    text = re.sub(r"^\S+\.(npz|safetensors|pt): ", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)  # damaged keys and values
    text = re.sub(r"param\.\d+\.[a-z_]+(\.npy)?", "param.{i}.{field}", text)
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"\s*[({\[].*", "", text)
    return f"{type(error).__name__}: {text[:72]}"


def loader(
    flat: Mapping[str, Any], plans: Sequence[Any], header: state.Header
) -> Callable[[Path], bool]:
    """Load a file the way an adapter does; True when it equals ``flat``'s state."""
    original = state.import_state(flat, plans, header)

    def load(path: Path) -> bool:
        imported = state.import_state(
            state_files.load_state(path, like=flat), plans, header
        )
        return all(
            a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            for a, b in zip(imported, original, strict=True)
        )

    return load


def outcome(result: str, error: BaseException | None) -> str:
    """``judge``'s result, with any exception but a named ``ValueError`` re-raised."""
    if error is not None and not isinstance(error, ValueError):
        raise error
    return result


def tally(
    flat: Mapping[str, Any],
    plans: Sequence[Any],
    header: state.Header,
    workdir: Path,
    report: Callable[[Fault, str], None] | None = None,
) -> dict[str, Counter]:
    """Outcome counts per fault kind (``report`` sees every fault and its outcome)."""
    load = loader(flat, plans, header)
    counts: dict[str, Counter] = {}
    for fault in faults(flat, workdir):
        result = outcome(*judge(fault, load, workdir))
        counts.setdefault(f"{fault.kind} {fault.container}", Counter())[result] += 1
        if report is not None:
            report(fault, result)
    return counts
