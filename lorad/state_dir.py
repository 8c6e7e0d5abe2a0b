"""The state directory is private: it holds every original byte for byte and the records of them.

Outside systemd nothing else narrows it (StateDirectory= defaults to 0755 too), so lorad sets the
modes itself: the directory 0700, the SQLite database and its -wal/-shm/-journal files 0600,
store blobs 0400. With an operator group configured, its members may read (they may already
revert and switch over the socket): 0750, 0640 and 0440, group-owned by that group.

The files lorad materialises at watched paths are not the state's: they keep the mode of the file
they replace (see lorad.library.store), whatever is set here.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lorad.log import get_logger

log = get_logger("lorad.state")

SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Modes:
    """The modes of lorad's private files; `gid` is the operator group (None: owner only)."""

    gid: int | None = None

    @property
    def dir(self) -> int:
        return 0o750 if self.gid is not None else 0o700

    @property
    def file(self) -> int:
        return 0o640 if self.gid is not None else 0o600

    @property
    def blob(self) -> int:
        return 0o440 if self.gid is not None else 0o400


def secure_dir(path: Path, modes: Modes) -> None:
    """Create `path` (and parents) if needed and give it exactly the private directory mode."""
    path.mkdir(parents=True, exist_ok=True, mode=modes.dir)
    _set(path, modes.dir, modes.gid)


def secure_file(path: Path, mode: int, gid: int | None) -> None:
    """Give an existing file `mode` (and the operator group); a missing one is left missing."""
    with contextlib.suppress(FileNotFoundError):
        _set(path, mode, gid)


def secure_sqlite(db: Path, modes: Modes) -> None:
    """Create the database file with the private mode before SQLite does (SQLite gives its -wal
    and -shm files the database file's mode and owner), and narrow an existing one and its side
    files, which an older lorad left at the umask's 0644."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    for suffix in ("", *SQLITE_SIDE_FILES):
        secure_file(db.with_name(db.name + suffix), modes.file, modes.gid)


def _set(path: Path, mode: int, gid: int | None) -> None:
    st = os.stat(path)
    if gid is not None and st.st_gid != gid:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            # The group bits would then open it to whatever group it has: keep it the owner's.
            log.warning("cannot give a private file to the operator group (not a member?); kept it owner-only",
                        path=str(path), gid=gid)  # fmt: skip
            mode &= ~0o070
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
