"""The content-addressed blob store and atomic writes into watched folders.

Layout under the store's root (<state_dir>/store, or `store_dir`, which a fleet shares):
  objects/sha256/ab/<hex>   read-only blobs, named by the sha256 of their bytes
  tmp/                      partial ingests (same filesystem, so the final rename is atomic)
  bad/                      blobs that failed a re-hash, kept for inspection (never reused)

Ingest hashes while copying into tmp/ (sha256, the data section's sha256 and BLAKE3, in the one
read), fsyncs, then renames into objects/. A folder (a PEFT adapter) is stored as its files' blobs
plus its tree manifest (lorad.library.trees), itself a blob named by the sha256 of its bytes. Materialising a blob at a watched path writes
`.<name>.lorad-tmp` beside it (loaders list neither dot-files nor names without the .safetensors
suffix), fsyncs, renames over the target and fsyncs the folder, so a reader sees the old file or
the new one. The bytes are verified on the way: a corrupt blob never
reaches a watched path. Hardlinks are opt-in only: some tools edit safetensors metadata in place,
which would corrupt the store through a shared inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from blake3 import blake3

from lorad._atomic import fsync_dir, temp_name
from lorad._fileio import open_regular
from lorad.errors import StoreError, TransientError

LinkMode = Literal["reflink-or-copy", "reflink", "copy", "hardlink"]
LINK_MODES: tuple[str, ...] = ("reflink-or-copy", "reflink", "copy", "hardlink")
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): share the source's extents (btrfs, xfs)
CHUNK = 1 << 20
CRASH_ENV = "LORAD_TEST_CRASH_AT"


def _crashpoint(name: str) -> None:
    """Test hook: die here, as a power cut would, when LORAD_TEST_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class CorruptBlob(StoreError):
    """A blob's bytes no longer hash to its name."""

    def __init__(self, sha256: str, message: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


class TargetChanged(StoreError):
    """The watched file changed while lorad was preparing to replace it."""


class NoRoom(StoreError, TransientError):
    """A write ran out of room (disk full, quota, file size limit); nothing was changed."""


# Errors of a write that may succeed once room is made: the request was fine.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _refusal(e: OSError, message: str) -> StoreError:
    return NoRoom(message) if e.errno in _NO_ROOM else StoreError(message)


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    bytes: int
    data_sha256: str | None  # sha256 of the bytes after `data_offset` (safetensors data section)
    blake3: str | None = None  # BLAKE3 of the whole file (InvokeAI's id), where it was computed


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file cheaply: if any of these moved, the bytes may have."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_path(cls, path: Path) -> FileStamp | None:
        try:
            return cls.of(os.stat(path))
        except FileNotFoundError:
            return None

    @property
    def token(self) -> str:
        """The stamp as one string, as the records keep it."""
        return f"{self.device}:{self.inode}:{self.size}:{self.mtime_ns}"


class _Count:
    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._n += 1

    @property
    def value(self) -> int:
        return self._n


# Files read through to hash them in this process (watched files taken in or checked, blobs
# verified or copied out): `lorad status` shows it, so a restart that trusts recorded stamps can be
# seen to read none.
FILES_HASHED = _Count()


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def hash_file(path: Path) -> str:
    FILES_HASHED.add()
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def digest_file(path: Path) -> BlobInfo:
    """sha256 and BLAKE3 of a file in one read (verify fills in the BLAKE3 of blobs stored before
    lorad computed it)."""
    FILES_HASHED.add()
    hasher = _Hasher(None, with_blake3=True)
    with open_regular(path) as f:
        while block := f.read(CHUNK):
            hasher.update(block)
    return hasher.info()


class _Hasher:
    """sha256 of a stream, plus (optionally) of everything after a byte offset and the BLAKE3 of
    the whole, in one pass: the bytes are read once whatever is asked of them."""

    def __init__(self, data_offset: int | None, with_blake3: bool = False) -> None:
        self.whole = hashlib.sha256()
        self.data = hashlib.sha256() if data_offset is not None else None
        self.blake3 = blake3() if with_blake3 else None
        self.data_offset = data_offset or 0
        self.size = 0

    def info(self) -> BlobInfo:
        return BlobInfo(self.whole.hexdigest(), self.size, self.data.hexdigest() if self.data is not None else None,
                        self.blake3.hexdigest() if self.blake3 is not None else None)  # fmt: skip

    def update(self, block: bytes) -> None:
        self.whole.update(block)
        if self.blake3 is not None:
            self.blake3.update(block)
        if self.data is not None:
            skip = max(0, self.data_offset - self.size)
            if skip < len(block):
                self.data.update(memoryview(block)[skip:])
        self.size += len(block)


def _copy_hashing(src: BinaryIO, dst_fd: int, hasher: _Hasher) -> None:
    while block := src.read(CHUNK):
        view = memoryview(block)
        while view:
            view = view[os.write(dst_fd, view) :]
        hasher.update(block)


def copy_verified(src: BinaryIO, fd: int, sha256: str) -> None:
    """Copy a blob's bytes into `fd`; CorruptBlob if they no longer hash to its name."""
    FILES_HASHED.add()
    hasher = _Hasher(None)
    _copy_hashing(src, fd, hasher)
    if hasher.whole.hexdigest() != sha256:
        raise CorruptBlob(sha256, f"blob {sha256[:12]} is corrupt (its bytes no longer match)")


def _try_reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


class Store:
    def __init__(
        self, root: Path, link_mode: LinkMode = "reflink-or-copy", blob_mode: int = 0o400, gid: int | None = None
    ) -> None:
        """blob_mode/gid: what each stored blob gets (lorad.state_dir.Modes). Hardlink mode shares
        a blob's inode with the watched file, whose readers (any user's LoRA loader) need it
        world-readable, so blobs stay 0444 there."""
        if link_mode not in LINK_MODES:
            raise StoreError(f"unknown link mode {link_mode!r}; choose one of {', '.join(LINK_MODES)}")
        self.root = Path(root).resolve()
        self.link_mode = link_mode
        self.blob_mode = 0o444 if link_mode == "hardlink" else blob_mode
        self.gid = gid
        self.objects = self.root / "objects" / "sha256"
        self.tmp = self.root / "tmp"
        self.bad = self.root / "bad"
        for folder in (self.objects, self.tmp, self.bad):
            folder.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise StoreError(f"not a sha256 hex digest: {sha256!r}")
        return self.objects / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def digest(self, sha256: str) -> BlobInfo | None:
        """Re-hash a blob, BLAKE3 too, in one read; None when it is not in the store."""
        try:
            return digest_file(self.path_of(sha256))
        except FileNotFoundError:
            return None

    def present(self, sha256: str) -> bool:
        """Whether the blob is in the store now, asked by opening it: on NFS an open revalidates
        with the server (close-to-open), where a stat may answer from a cache for `actimeo`."""
        try:
            fd = os.open(self.path_of(sha256), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        os.close(fd)
        return True

    def clock(self) -> float:
        """The store's filesystem's time now (a file server's own, on NFS): the mtime of a file just
        created in tmp/. gc ages unrecorded blobs (mtimes set by that same clock) against it."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="clock-")
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            _remove_quietly(Path(name))

    def is_intact(self, sha256: str) -> bool:
        """Re-hash a blob: True when present and its bytes still hash to its name."""
        try:
            return hash_file(self.path_of(sha256)) == sha256
        except FileNotFoundError:
            return False

    def blobs(self) -> Iterator[str]:
        """Every blob name on disk (whether or not the database knows it)."""
        for shard in sorted(self.objects.iterdir()):
            if shard.is_dir():
                for blob in sorted(shard.iterdir()):
                    if blob.parent.name == blob.name[:2] and len(blob.name) == 64:
                        yield blob.name

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp.iterdir())

    # -- writing ---------------------------------------------------------------------------------

    def ingest(
        self, src: Path, *, data_offset: int | None = None, expect_sha256: str | None = None
    ) -> BlobInfo:
        """Copy `src` into the store, hashing on the way; the blob is complete or absent.

        Refuses (StoreError, nothing stored) when `src` changes while being copied, when it does
        not hash to `expect_sha256`, or when the disk fills up.
        """
        src = Path(src)
        return self._new_blob(lambda fd: self._copy_in(src, fd, data_offset), str(src), expect_sha256)

    def ingest_bytes(self, data: bytes) -> BlobInfo:
        """Store bytes held in memory (a tree manifest) as a blob; complete or absent."""
        hasher = _Hasher(None, with_blake3=True)
        hasher.update(data)
        info = hasher.info()
        if self.is_intact(info.sha256):
            return info

        def fill(fd: int) -> BlobInfo:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            return info

        return self._new_blob(fill, "a tree manifest")

    def _new_blob(self, fill: Callable[[int], BlobInfo], what: str, expect_sha256: str | None = None) -> BlobInfo:
        """Write a blob through a temp file in tmp/ (`fill(fd)` writes, fsyncs and hashes it), give
        it the store's owner group and mode, and place it: complete or absent. `what`: the source,
        as errors name it."""
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="ingest-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                info = fill(out.fileno())
                if self.gid is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(out.fileno(), -1, self.gid)
                os.fchmod(out.fileno(), self.blob_mode)
            if expect_sha256 is not None and info.sha256 != expect_sha256:
                raise StoreError(f"{what}: hashes to {info.sha256[:12]}, expected {expect_sha256[:12]}; not stored")
            self._place(tmp, info.sha256)
            return info
        except OSError as e:
            raise _refusal(e, f"cannot store {what}: {_why(e)}; nothing was stored") from e
        finally:
            _remove_quietly(tmp)

    def read_blob(self, sha256: str, limit: int = 16 << 20) -> bytes:
        """A small blob's bytes (a tree manifest), checked against its name."""
        try:
            with open_regular(self.path_of(sha256)) as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise StoreError(f"blob {sha256[:12]} is missing from the store") from None
        if len(data) > limit or hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptBlob(sha256, f"blob {sha256[:12]} is corrupt (its bytes no longer match)")
        return data

    def write_out(self, sha256: str, dest: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
        """Create `dest` (which must not exist) holding the blob's bytes, checked on the way, with
        `mode` (hardlink mode shares the blob's inode, and so its mode), fsynced."""
        blob = self.path_of(sha256)
        if not blob.is_file():
            raise StoreError(f"blob {sha256[:12]} is missing from the store ({blob})")
        if self.link_mode == "hardlink":
            self._link_verified(blob, sha256, dest)
            return
        self._clone_or_copy_verified(blob, sha256, dest, mode, owner)

    def _copy_in(self, src: Path, out_fd: int, data_offset: int | None) -> BlobInfo:
        FILES_HASHED.add()
        hasher = _Hasher(data_offset, with_blake3=True)
        # open_regular: the file may have been swapped for a FIFO since it was looked at, and a
        # plain open() would block on it for good, holding the library's lock.
        with open_regular(src) as f:
            before = FileStamp.of(os.fstat(f.fileno()))
            _copy_hashing(f, out_fd, hasher)
            os.fsync(out_fd)
        _crashpoint("store:ingest:after-temp-write")
        if _stamp_or_none(src) != before or hasher.size != before.size:
            raise StoreError(f"{src}: changed while being stored; try again once it is settled")
        return hasher.info()

    def _place(self, tmp: Path, sha256: str) -> None:
        # Another process (a node sharing this store) may place the same blob at the same time:
        # each renames its own complete, verified temp file, so the address holds whole, identical
        # bytes whichever rename comes last.
        final = self.path_of(sha256)
        if final.exists():
            if self.is_intact(sha256):
                return
            with contextlib.suppress(FileNotFoundError):  # (another process moved it aside first)
                self.quarantine(sha256)  # a damaged copy: the fresh one replaces it
        shard_is_new = not final.parent.exists()
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        _crashpoint("store:ingest:after-rename")
        fsync_dir(final.parent)
        if shard_is_new:
            fsync_dir(self.objects)

    def quarantine(self, sha256: str) -> Path:
        """Move a blob to bad/ (named with the time) so it is never served again."""
        blob = self.path_of(sha256)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.bad / f"{sha256}.{stamp}"
        os.replace(blob, dest)
        fsync_dir(blob.parent)
        fsync_dir(self.bad)
        return dest

    def remove(self, sha256: str) -> None:
        blob = self.path_of(sha256)
        _remove_quietly(blob)
        fsync_dir(blob.parent)

    def materialize(self, sha256: str, target: Path, expect: FileStamp | None = None) -> None:
        """Make `target` hold the blob's bytes, atomically.

        `expect`: the target's stamp when the caller last checked its contents; if the target no
        longer matches it just before the rename, nothing is replaced (TargetChanged).
        """
        blob = self.path_of(sha256)
        if not blob.is_file():
            raise StoreError(f"blob {sha256[:12]} is missing from the store ({blob})")
        tmp = temp_name(target)
        try:
            _remove_quietly(tmp)  # ours by name: left by an interrupted run
            mode, owner = _target_mode_owner(target)
            if self.link_mode == "hardlink":
                self._link_verified(blob, sha256, tmp)
            else:
                self._clone_or_copy_verified(blob, sha256, tmp, mode, owner)
            if expect is not None and _stamp_or_none(target) != expect:
                raise TargetChanged(f"{target}: changed while lorad was replacing it; left as it is")
            os.replace(tmp, target)
            _crashpoint("materialize:after-rename")
            fsync_dir(target.parent)
            _crashpoint("materialize:after-dir-fsync")
        except OSError as e:
            _remove_quietly(tmp)
            raise _refusal(e, f"cannot write {target}: {_why(e)}; the file was left as it was") from e
        except BaseException:
            _remove_quietly(tmp)
            raise

    def _link_verified(self, blob: Path, sha256: str, tmp: Path) -> None:
        self._require_intact(sha256)
        os.link(blob, tmp)
        _crashpoint("materialize:after-temp-write")
        _crashpoint("materialize:after-fsync")

    def _clone_or_copy_verified(
        self, blob: Path, sha256: str, tmp: Path, mode: int, owner: tuple[int, int] | None
    ) -> None:
        with open(blob, "rb") as src:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self._fill(src, fd, sha256)
                _crashpoint("materialize:after-temp-write")
                if owner is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, *owner)
                os.fchmod(fd, mode)
                os.fsync(fd)
                _crashpoint("materialize:after-fsync")
            finally:
                os.close(fd)

    def _fill(self, src: BinaryIO, fd: int, sha256: str) -> None:
        if self.link_mode != "copy" and _try_reflink(src.fileno(), fd):
            self._require_intact(sha256)  # a clone copies no bytes, so read the blob to check it
            return
        if self.link_mode == "reflink":
            raise StoreError(f"the filesystem under {self.root} cannot reflink; use link_mode copy")
        copy_verified(src, fd, sha256)

    def _require_intact(self, sha256: str) -> None:
        if not self.is_intact(sha256):
            raise CorruptBlob(sha256, f"blob {sha256[:12]} is corrupt (its bytes no longer match)")


def _stamp_or_none(path: Path) -> FileStamp | None:
    try:
        return FileStamp.of(os.stat(path))
    except FileNotFoundError:
        return None


def _current_umask() -> int:
    """The umask, read without setting it: os.umask() can only be read by changing it, process-
    wide, which would open a window where other threads create world-writable files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # the usual default, where /proc does not say


def _target_mode_owner(target: Path) -> tuple[int, tuple[int, int] | None]:
    """Keep the replaced file's permissions (and owner, when we may set it); else 0666 - umask."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return 0o666 & ~_current_umask(), None
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    return stat.S_IMODE(st.st_mode), owner
