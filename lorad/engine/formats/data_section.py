"""A safetensors data section gathered while its tensors are still being made.

A reduction makes its modules batch by batch, and the header, which comes first in the file, can
only be written once every rank is known. Holding every output tensor until then costs as much
memory as the output (143 MB for the SDXL benchmark file). Instead each tensor is appended to an
unnamed temp file beside the output as soon as it is made, with a CRC of its bytes; the output's
data section is then laid out in the input's key order (which the output keeps) and copied from
there by the kernel, and every byte read back on the way is checked against its CRC.
"""

from __future__ import annotations

import errno
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorad.errors import FormatError, ReduceError

CHUNK = 1 << 20
# copy_file_range is missing or refused across some filesystems (NFS before 4.2, FUSE, old kernels)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


@dataclass(frozen=True)
class Placed:
    """Where one tensor's bytes are in a data section, and how they are read."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class DataSection:
    def __init__(self, folder: Path):
        # O_TMPFILE where the filesystem has it, else a name unlinked at once: a killed process
        # leaves nothing behind, and no watcher ever sees the file
        self._file = tempfile.TemporaryFile(dir=folder, buffering=0)
        self._fd = self._file.fileno()
        self.placed: dict[str, Placed] = {}  # each tensor's place in the temp file, in the order made
        self._crc: dict[str, int] = {}
        self.size = 0

    def __contains__(self, key: str) -> bool:
        return key in self.placed

    def fileno(self) -> int:
        return self._fd

    def put(self, key: str, dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._place(key, dtype, shape, len(view))
        self._crc[key] = self._append(view, 0)

    def copy_from(self, key: str, dtype: str, shape: tuple[int, ...], src: Path, fd: int, offset: int,
                  nbytes: int) -> None:
        """Append `nbytes` from `offset` of the file `src`, open as `fd` (a tensor passed through bit
        for bit)."""
        self._place(key, dtype, shape, nbytes)
        crc, done = 0, 0
        while done < nbytes:
            block = os.pread(fd, min(CHUNK, nbytes - done), offset + done)
            if not block:
                raise FormatError(f"{src}: truncated while reading {key!r}")
            crc = self._append(memoryview(block), crc)
            done += len(block)
        self._crc[key] = crc

    def _place(self, key: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if key in self.placed:
            raise ValueError(f"{key!r} is already in the data section")
        self.placed[key] = Placed(dtype, tuple(shape), self.size, self.size + nbytes)
        self.size += nbytes

    def _append(self, view: memoryview, crc: int) -> int:
        crc = zlib.crc32(view, crc)
        while view:
            view = view[os.write(self._fd, view) :]
        return crc

    def lay_out(self, order: list[str]) -> dict[str, Placed]:
        """Every tensor's place in a data section holding them in `order` (each key once, all of them)."""
        if sorted(order) != sorted(self.placed):
            raise ValueError("a data section's order must list each of its tensors once")
        entries, at = {}, 0
        for key in order:
            p = self.placed[key]
            entries[key] = Placed(p.dtype, p.shape, at, at + p.end - p.start)
            at += p.end - p.start
        return entries

    def chunks(self, order: list[str]) -> Iterator[bytes]:
        """The data section laid out in `order`, a chunk at a time; each tensor's bytes are checked
        against the CRC taken when it was made."""
        for key in order:
            p, crc = self.placed[key], 0
            for at in range(p.start, p.end, CHUNK):
                block = os.pread(self._fd, min(CHUNK, p.end - at), at)
                if len(block) != min(CHUNK, p.end - at):
                    raise OSError(errno.EIO, "the temp data section came back short")
                crc = zlib.crc32(block, crc)
                yield block
            if crc != self._crc[key]:
                raise ReduceError(f"{key!r} changed between being made and being written; nothing was written")

    def copy_to(self, out_fd: int, order: list[str]) -> None:
        """Append the data section laid out in `order` to `out_fd` at its position, in the kernel where
        it can; where the filesystem refuses, the part copied is cut off and it all goes through
        `chunks` instead."""
        start = os.lseek(out_fd, 0, os.SEEK_CUR)
        try:
            for key in order:
                p = self.placed[key]
                at = p.start
                while at < p.end:
                    n = os.copy_file_range(self._fd, out_fd, p.end - at, at)
                    if n == 0:
                        raise OSError(errno.EIO, "the temp data section came back short")
                    at += n
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            os.ftruncate(out_fd, start)
            os.lseek(out_fd, start, os.SEEK_SET)
            for block in self.chunks(order):
                view = memoryview(block)
                while view:
                    view = view[os.write(out_fd, view) :]

    def close(self) -> None:
        self._file.close()
