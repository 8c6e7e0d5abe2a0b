"""Folders as content: the tree of a flat folder (its regular files, each with its mode and sha256),
the canonical manifest that names it, and the cheap stamp that tells whether it may have changed.

The manifest is what the store keeps as the folder's "tree blob", so a tree's sha256 is the sha256
of these exact bytes, like any other blob's, and a tree can be read back from the store alone:

    b"lorad-tree 1\\n"
    then per entry, sorted by the name's bytes:  b"%o %s\\0%s\\n" % (mode, name, sha256 hex)

A name holds neither NUL nor "/", so the format parses without escapes; names that are not UTF-8
keep their exact bytes (os.fsencode). `mode` is the entry's permission bits (0o777 at most): a
chmod changes the folder as a user would see it, so it changes the tree.

Only flat folders are trees: a subfolder, a symlink or any other non-regular entry is refused by
`entries_of` (lorad replaces an adapter folder whole and would not carry them along).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorad._atomic import is_temp_name
from lorad._fileio import describe_mode
from lorad.errors import FormatError, NotRegularFileError, StoreError
from lorad.library.store import hash_file

MAGIC = b"lorad-tree 1\n"


@dataclass(frozen=True)
class Entry:
    """One file of a tree."""

    name: str
    sha256: str
    mode: int


@dataclass(frozen=True)
class Listed:
    """One regular file found in a folder, as stat saw it."""

    name: str
    path: Path
    st: os.stat_result

    @property
    def mode(self) -> int:
        return stat.S_IMODE(self.st.st_mode) & 0o777


class NotFlatFolder(FormatError):
    """A folder holding a subfolder, a symlink or another non-regular entry."""


def encode(entries: Iterable[Entry]) -> bytes:
    rows = sorted(entries, key=lambda e: os.fsencode(e.name))
    names = [os.fsencode(e.name) for e in rows]
    if len(set(names)) != len(names):
        raise StoreError("a tree cannot hold two entries of one name")
    out = [MAGIC]
    for e, name in zip(rows, names):
        if not name or b"/" in name or b"\0" in name:
            raise StoreError(f"{e.name!r} cannot be a name in a folder")
        out.append(b"%o %s\0%s\n" % (e.mode, name, e.sha256.encode("ascii")))
    return b"".join(out)


def decode(data: bytes) -> list[Entry]:
    if not data.startswith(MAGIC):
        raise StoreError("not a lorad tree manifest")
    entries = []
    rest = data[len(MAGIC) :]
    while rest:
        head, sep, rest = rest.partition(b"\0")
        sha, newline, rest = rest[:64], rest[64:65], rest[65:]
        mode_text, space, name = head.partition(b" ")
        if not (sep and space and newline == b"\n" and len(sha) == 64):
            raise StoreError("a damaged lorad tree manifest")
        entries.append(Entry(os.fsdecode(name), sha.decode("ascii"), int(mode_text, 8)))
    return entries


def tree_sha256(entries: Iterable[Entry]) -> str:
    return hashlib.sha256(encode(entries)).hexdigest()


def entries_of(folder: Path) -> list[Listed]:
    """The regular files directly in `folder` (not following symlinks), sorted by name; refuses a
    folder holding anything else (NotFlatFolder), and is not a folder (NotRegularFileError).
    lorad's own temp names are left out: they are never part of a LoRA."""
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise NotRegularFileError(f"{folder}: {describe_mode(st.st_mode)}, not a folder")
    listed = []
    for item in sorted(os.scandir(folder), key=lambda d: os.fsencode(d.name)):
        path = Path(item.path)
        if is_temp_name(path):
            continue
        est = os.lstat(path)
        if stat.S_ISDIR(est.st_mode):
            raise NotFlatFolder(f"{folder}: holds a subfolder ({item.name}); lorad replaces an adapter "
                                "folder whole and takes only flat ones")  # fmt: skip
        if not stat.S_ISREG(est.st_mode):
            what = "a symlink" if stat.S_ISLNK(est.st_mode) else describe_mode(est.st_mode)
            raise NotFlatFolder(f"{folder}: {item.name} is {what}; lorad takes only folders of regular files")
        listed.append(Listed(item.name, path, est))
    return listed


def stamp_of(folder: Path) -> str | None:
    """A cheap token that moves whenever the folder's contents may have: the folder's own
    (device, inode) and every entry's (name, inode, size, mtime_ns, mode). None when it is gone or
    no flat folder."""
    try:
        st = os.stat(folder)
        listed = entries_of(folder)
    except (OSError, FormatError):
        return None
    h = hashlib.sha256()
    for e in listed:
        h.update(os.fsencode(e.name) + b"\0")
        h.update(f"{e.st.st_ino}:{e.st.st_size}:{e.st.st_mtime_ns}:{e.mode:o}\n".encode())
    return f"tree:{st.st_dev}:{st.st_ino}:{h.hexdigest()[:32]}"


def hash_folder(folder: Path) -> tuple[str, list[Entry]]:
    """The tree sha256 of a folder as it is on disk, and its entries (every file read)."""
    entries = [Entry(e.name, hash_file(e.path), e.mode) for e in entries_of(folder)]
    return tree_sha256(entries), entries


def write_entries(entries: Sequence[Entry], dest: Path, fill: Callable[[Entry, int], None]) -> None:
    """Create every entry of a tree in the (empty) folder `dest`: `fill(entry, fd)` writes its
    bytes; each file gets its mode and is fsynced."""
    for e in entries:
        fd = os.open(dest / e.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fill(e, fd)
            os.fchmod(fd, e.mode)
            os.fsync(fd)
        finally:
            os.close(fd)
