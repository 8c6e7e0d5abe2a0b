"""The safetensors container itself: a validated header reader, the header a writer writes, and
the hashes that loaders and Civitai compute over it.

Layout: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}}
plus an optional "__metadata__" of str -> str), then the data section. Nothing here imports torch
for reading, so the watcher can check completeness cheaply; nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorad._fileio import open_regular
from lorad.errors import FormatError, IncompleteError, PickleError

# safetensors' own reader refuses headers over 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_SIZE = 0x10000

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (.pt/.ckpt), which holds a pickle


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset within the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    header_bytes: int  # N, the JSON length
    file_bytes: int
    tensors: dict[str, TensorEntry]  # in data-offset order
    metadata: dict[str, str]

    @property
    def data_offset(self) -> int:
        return 8 + self.header_bytes


def _looks_like_pickle(head: bytes) -> bool:
    """Pickle or zip magic, and not the "{" that opens every safetensors header at byte 8."""
    return (head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGIC) and head[8:9] != b"{"


def _pickle_error(path: Path) -> FormatError:
    return PickleError(
        f"{path}: this is a pickle-based checkpoint (.ckpt/.pt), which can run code when loaded;"
        " lorad never unpickles. Convert it to .safetensors with a tool you trust."
    )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header without reading the data.

    Raises FormatError with one clear line for: a pickle, a short or truncated file, an absurd or
    oversized header, bad JSON, bad entries, overlapping or out-of-range offsets, or a data section
    whose length does not match the file size (a partly written download). A FIFO, socket or
    device is refused before anything is read (NotRegularFileError).

    Structure decides, not magic bytes: a header of 640 bytes starts with 80 02, the pickle magic,
    so a pickle is named only when the bytes do not make a safetensors header.
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            if len(head) < 9:
                if _looks_like_pickle(head):
                    raise _pickle_error(path)
                raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES or 8 + n > size:
                if _looks_like_pickle(head):
                    raise _pickle_error(path)
                if n > MAX_HEADER_BYTES:
                    raise FormatError(
                        f"{path}: safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES}); "
                        "not a safetensors file or a hostile one"
                    )
                raise IncompleteError(f"{path}: truncated: header needs {8 + n} bytes, file has {size}")
            raw = head[8:] + f.read(n - 1) if n else b""
    except FormatError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return _parse_header(path, raw, size)
    except FormatError:
        if _looks_like_pickle(head):
            raise _pickle_error(path) from None
        raise


def _parse_header(path: Path, raw: bytes, size: int) -> Header:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: bad safetensors __metadata__ (must map strings to strings)")
    entries = [_entry(path, name, spec) for name, spec in doc.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    expected = 0
    for e in entries:
        if e.start != expected:
            raise FormatError(f"{path}: tensor {e.name!r} data offsets overlap or leave a gap")
        expected = e.end
    data_len = size - 8 - len(raw)
    if expected != data_len:
        what = "truncated (still being written?)" if expected > data_len else "has trailing bytes"
        raise (IncompleteError if expected > data_len else FormatError)(
            f"{path}: {what}: tensors need {expected} data bytes, file holds {data_len}"
        )
    return Header(path, len(raw), size, {e.name: e for e in entries}, dict(metadata))


def _entry(path: Path, name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict):
        raise FormatError(f"{path}: bad header entry for {name!r}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise FormatError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
    if math.prod(shape) * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise FormatError(f"{path}: tensor {name!r}: shape {shape} and {dtype} disagree with its bytes")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when the file is a whole, valid safetensors file (header parses, sizes match)."""
    try:
        read_header(path)
    except FormatError:
        return False
    return True


def read_raw(header: Header, name: str) -> bytes:
    """The exact bytes of one tensor (for pass-through keys, copied bit for bit)."""
    e = header.tensors[name]
    with open_regular(header.path) as f:
        f.seek(header.data_offset + e.start)
        data = f.read(e.nbytes)
    if len(data) != e.nbytes:
        raise FormatError(f"{header.path}: truncated while reading {name!r}")
    return data


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class RawTensor:
    """A tensor ready to write: its safetensors dtype, shape and little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def file_prefix(entries: dict[str, tuple[str, tuple[int, ...], int, int]], metadata: dict[str, str]) -> bytes:
    """The bytes before the data section: the header's length, then the header, whose keys come
    in the given order, each as (dtype, shape, start, end) within the data section."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = metadata
    for name, (dtype, shape, start, end) in entries.items():
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def legacy_hash(header_and_data: Iterable[bytes | memoryview]) -> str:
    """kohya/addnet `sshs_legacy_hash`: first 8 hex of sha256 of 64 KiB at offset 1 MiB."""
    h = hashlib.sha256()
    pos = 0
    lo, hi = LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_SIZE
    for chunk in header_and_data:
        n = len(chunk)
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            h.update(memoryview(chunk)[a - pos : b - pos])
        pos += n
        if pos >= hi:
            break
    return h.hexdigest()[:8]


# ---------------------------------------------------------------------------------------------
# Hashes of a file on disk


def file_hashes(path: str | os.PathLike[str], data_offset: int) -> tuple[str, str]:
    """(sha256 of the file, sha256 of what follows its first `data_offset` bytes) in one read of
    the file; the two hashes of each block run side by side (hashlib releases the GIL)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open_regular(path) as f, ThreadPoolExecutor(1, thread_name_prefix="lorad-hash") as pool:
        whole.update(f.read(data_offset))
        pending: Future[None] | None = None
        while block := f.read(1 << 20):
            if pending is not None:
                pending.result()
            pending = pool.submit(data.update, block)
            whole.update(block)
        if pending is not None:
            pending.result()
    return whole.hexdigest(), data.hexdigest()


def file_data_sha256(path: str | os.PathLike[str], header: Header | None = None) -> str:
    """sha256 of everything after the header: addnet / sshs_model_hash / Civitai AutoV3 (full)."""
    header = header or read_header(path)
    h = hashlib.sha256()
    with open_regular(path) as f:
        f.seek(header.data_offset)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
