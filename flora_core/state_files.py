"""State files: atomic writes and bounded, validated reads (docs/spec.md §5.5).

Two containers hold the flat portable form of :mod:`flora_core.state`: ``.npz``
(uncompressed zip of ``.npy`` members) and ``.safetensors``; both are written and read
here with no other dependency (the safetensors layout is written by hand and loads in
the ``safetensors`` package too).

NOTE [atomic writes]: a state is written to a temporary file in the target's directory,
flushed and fsynced, then renamed over the target (atomic on POSIX and Windows) and the
directory fsynced: a process killed mid-save leaves the previous file whole.

NOTE [bounded reads]: before any array is read, the container's index is parsed and
checked: every key must be a portable-state key (unknown keys are refused, not read),
every declared dtype must be a plain numeric one, every declared size must match the
bytes the container really holds for it (so nothing larger than the file is ever
allocated: a compressed npz member, a lying ``.npy`` header or a safetensors offset
past the end is refused), and with ``like=`` every key's dtype and shape must be the
target's. Then the arrays are read, and :func:`flora_core.state.import_state` checks
the checksum and the meaning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import tokenize
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from flora_core.state import expected_layout, is_state_key

SUFFIXES = (".npz", ".safetensors")
# numpy dtype <-> safetensors code, for the dtypes a state holds.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
SAFETENSORS_CODES = {np.dtype(v).str: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 64 * 2**20


def _suffix(path: str) -> str:
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise ValueError(f"Unknown state file type {path!r}; use .npz or .safetensors")


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def save_state(flat: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the portable form to ``path`` (``.npz`` or ``.safetensors``), atomically
    (NOTE [atomic writes])."""
    path = os.fspath(path)
    suffix = _suffix(path)
    arrays = {k: np.asarray(v, order="C") for k, v in flat.items()}
    for key, value in arrays.items():
        if not is_state_key(key):
            raise ValueError(f"{key!r} is not a portable-state key")
        if value.dtype.hasobject:
            raise ValueError(f"{key}: object arrays cannot be saved")
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(handle, "wb") as f:
            if suffix == ".npz":
                np.savez(f, **arrays)  # type: ignore[arg-type]
            else:
                _write_safetensors(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_safetensors(f: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "flora-state"}}
    offset = 0
    order = sorted(arrays)
    for key in order:
        value = arrays[key]
        code = SAFETENSORS_CODES.get(value.dtype.newbyteorder("<").str)
        if code is None:
            raise ValueError(f"{key}: dtype {value.dtype} cannot go into safetensors")
        header[key] = {
            "dtype": code,
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for key in order:
        f.write(arrays[key].astype(arrays[key].dtype.newbyteorder("<")).tobytes())


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One array a container declares, checked before it is read."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # safetensors: byte offset of the data; npz: unused
    member: str  # npz: the zip member; safetensors: unused

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize


def load_state(
    path: str | os.PathLike[str],
    *,
    like: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Read the portable form written by :func:`save_state` (NOTE [bounded reads]).

    Args:
        path: a ``.npz`` or ``.safetensors`` file.
        like: the target's own flat state (e.g. its ``export_state()``): every key in
            the file must be one of its keys, with its dtype and shape, or the file
            is refused before anything is read.
        max_bytes: refuse a file whose arrays would take more than this.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    suffix = _suffix(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            index = (
                _npz_index(f, path) if suffix == ".npz" else _safetensors_index(f, size)
            )
            _check_index(index, like, max_bytes)
            if suffix == ".npz":
                return _read_npz(f, index)
            return {k: _read_range(f, e) for k, e in index.items()}
    except (
        zipfile.BadZipFile,  # a damaged archive
        NotImplementedError,  # zipfile: an unknown version or method byte
        RuntimeError,  # zipfile: an "encrypted" flag
        UnicodeDecodeError,  # a member name that is not UTF-8
        EOFError,
        struct.error,
        OSError,
    ) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable state file ({error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _check_index(
    index: Mapping[str, _Entry],
    like: Mapping[str, Any] | None,
    max_bytes: int | None,
) -> None:
    unknown = sorted(k for k in index if not is_state_key(k))
    if unknown:
        raise ValueError(f"unknown keys {unknown[:5]} (refused, not read)")
    for key, entry in index.items():
        if entry.dtype.kind not in "biuf":
            raise ValueError(f"{key} has dtype {entry.dtype}, not a plain numeric one")
    if like is not None:
        expected = expected_layout(like)
        for key, entry in index.items():
            if key not in expected:
                continue  # read by import_state's checks, which say what is extra
            dtype, shape = expected[key]
            if (entry.dtype.str, entry.shape) != (dtype, shape):
                raise ValueError(
                    f"{key}: file {entry.dtype.str} {entry.shape}, optimizer "
                    f"{dtype} {shape}"
                )
    total = sum(e.nbytes for e in index.values())
    if max_bytes is not None and total > max_bytes:
        raise ValueError(
            f"the arrays take {total} bytes, more than max_bytes={max_bytes}"
        )


def _npz_index(f: IO[bytes], path: str) -> dict[str, _Entry]:
    index: dict[str, _Entry] = {}
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not an .npy array")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(
                    f"member {info.filename!r} is compressed; state files are written "
                    "uncompressed (flora_core.state_files.save_state)"
                )
            with archive.open(info) as member:
                dtype, shape, header_bytes = _npy_header(member)
            entry = _Entry(dtype, shape, 0, info.filename)
            if info.file_size != header_bytes + entry.nbytes:
                raise ValueError(
                    f"{info.filename}: declares {entry.nbytes} bytes of {dtype} "
                    f"{shape} but holds {info.file_size - header_bytes}"
                )
            index[info.filename[: -len(".npy")]] = entry
    return index


def _npy_header(member: IO[bytes]) -> tuple[np.dtype, tuple[int, ...], int]:
    from numpy.lib import format as npy

    version = npy.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    try:
        shape, fortran, dtype = read(member)
    except (SyntaxError, tokenize.TokenError, TypeError) as error:
        # numpy parses the header as a Python literal: a damaged one fails there
        raise ValueError(f"malformed .npy header ({type(error).__name__})") from None
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered arrays are not written by Flora")
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would need pickle)")
    return dtype, tuple(int(s) for s in shape), member.tell()


def _read_npz(f: IO[bytes], index: Mapping[str, _Entry]) -> dict[str, np.ndarray]:
    out = {}
    with zipfile.ZipFile(f) as archive:
        for key, entry in index.items():
            with archive.open(entry.member) as member:
                _npy_header(member)
                data = _read_exact(member, entry.nbytes)
                member.read()  # to the end: zipfile checks the member's CRC there
            out[key] = np.frombuffer(data, entry.dtype).reshape(entry.shape).copy()
    return out


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated: expected {n} bytes, got {len(data)}")
    return data


def _safetensors_index(f: IO[bytes], size: int) -> dict[str, _Entry]:
    (length,) = struct.unpack("<Q", _read_exact(f, 8))
    if not 2 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(f"its header length {length} does not fit a {size}-byte file")
    try:
        header = json.loads(_read_exact(f, length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a JSON object")
    data_start, data_size = 8 + length, size - 8 - length
    index, spans = {}, []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[spec["dtype"]])
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{key}: malformed entry {spec!r}") from None
        entry = _Entry(dtype, shape, data_start + begin, "")
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size:
            raise ValueError(f"{key}: offsets {begin}..{end} outside the data")
        if end - begin != entry.nbytes:
            raise ValueError(
                f"{key}: declares {entry.nbytes} bytes but spans {end - begin}"
            )
        index[key] = entry
        spans.append((begin, end))
    spans.sort()
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise ValueError("two arrays overlap in the data")
    return index


def _read_range(f: IO[bytes], entry: _Entry) -> np.ndarray:
    f.seek(entry.start)
    data = _read_exact(f, entry.nbytes)
    return (
        np.frombuffer(data, entry.dtype.newbyteorder("<")).reshape(entry.shape).copy()
    )
