"""Putting a whole folder at a watched path: a reader resolving the folder sees the old one or the
new one, never a mix of their files.

The new folder is built complete (every file written, checked, fsynced, then the folder), and then
exchanged with the target by renameat2(RENAME_EXCHANGE): one atomic step after which the old folder
sits where the new one was built, to be checked and removed. Where it is built matters:

  - In the swap area (`<state_dir>/swap`), when that lies on the target's filesystem. The exchange
    then moves the old folder OUT of the watched tree. Building beside the target instead
    (`.<name>.lorad-tmp`) would put two watched folders through an exchange, which watchdog's
    inotify bookkeeping cannot follow (watchdog 7: it keeps each watch under the other's path,
    then its event thread dies with a KeyError when the old folder is removed, and the daemon
    stops seeing changes); an exchange with a folder it never watched is seen as a move in.
  - Beside the target, as `.<name>.lorad-tmp`, when the swap area is on another filesystem. Then
    (for the reason above) and wherever RENAME_EXCHANGE is not supported (EINVAL: some network and
    FUSE filesystems), the swap falls back to two renames: the old folder aside (`.<name>.lorad-old`
    or the swap area), the new one in. Between the two the name is unbound for an instant: a reader
    then finds no folder (never a mixed one), and a crash there leaves the old folder aside, which
    `recover` (run by every reconcile: verify, revert, switch, activation) puts back. A warning says
    so once per process and reason.

Each step has a crash point (lorad.library.store._crashpoint) for the crash tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from lorad._atomic import aside_name, exchange, fsync_dir, remove_tree, temp_name
from lorad.library import trees
from lorad.library.store import TargetChanged, _crashpoint
from lorad.pathtext import shown

log = structlog.get_logger()

_warned: set[str] = set()


@dataclass(frozen=True)
class Places:
    new: Path  # where the new folder is built
    old: Path  # where the old folder waits during a two-rename swap
    in_area: bool  # both lie in the swap area (on the target's filesystem)


def places(target: Path, area: Path) -> Places:
    try:
        same_fs = os.stat(area).st_dev == os.stat(target.parent).st_dev
    except OSError:
        same_fs = False
    if same_fs:
        key = hashlib.sha256(os.fsencode(target)).hexdigest()[:24]
        return Places(area / f"{key}.new", area / f"{key}.old", True)
    return Places(temp_name(target), aside_name(target), False)


def leftovers(target: Path, area: Path) -> list[Path]:
    """What an interrupted swap of `target` may have left (built, or old, folders)."""
    p = places(target, area)
    found = [x for x in dict.fromkeys((p.new, p.old, temp_name(target), aside_name(target))) if os.path.lexists(x)]
    return found


def recover(target: Path, area: Path) -> bool:
    """A two-rename swap interrupted between its renames left `target` unbound and the old folder
    aside: put it back. True when it did."""
    if os.path.lexists(target):
        return False
    p = places(target, area)
    for old in dict.fromkeys((p.old, aside_name(target))):
        if old.is_dir() and not old.is_symlink():
            os.rename(old, target)
            fsync_dir(target.parent)
            log.warning("put back a folder an interrupted swap had moved aside", path=shown(target), was=shown(old))
            return True
    return False


def _warn_once(reason: str, target: Path) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("swapping adapter folders with two renames, not atomically: for an instant the "
                    "folder's name is unbound (a reader finds no folder, never a mixed one)",
                    reason=reason, path=shown(target))  # fmt: skip


def swap(target: Path, area: Path, expect: str | None, build: Callable[[Path], None],
         mode: int, owner: tuple[int, int] | None) -> Path:  # fmt: skip
    """Make `target` the folder `build(folder)` fills, and return where the old folder now lies
    (the caller checks it and removes it). `expect`: the target's stamp (lorad.library.trees.stamp_of) when
    the caller last knew its contents; if it moved, nothing is replaced (TargetChanged)."""
    p = places(target, area)
    remove_tree(p.new)  # ours by name: left by an interrupted run (recover ran before, so the
    remove_tree(p.old)  # target is bound and anything aside is stale)
    swapped = False
    try:
        os.mkdir(p.new, 0o700)
        build(p.new)
        _crashpoint("folder:after-temp-write")
        if owner is not None:
            os.chown(p.new, *owner)
        os.chmod(p.new, mode)
        fsync_dir(p.new)
        fsync_dir(p.new.parent)
        _crashpoint("folder:after-fsync")
        if expect is not None and trees.stamp_of(target) != expect:
            raise TargetChanged(f"{target}: changed while lorad was replacing it; left as it is")
        if p.in_area and exchange(p.new, target):
            swapped = True
            _crashpoint("folder:after-exchange")
            fsync_dir(target.parent)
            fsync_dir(p.new.parent)
            _crashpoint("folder:after-dir-fsync")
            return p.new
        _warn_once("RENAME_EXCHANGE unsupported here" if p.in_area else
                   "the state directory is on another filesystem than the watched folder", target)  # fmt: skip
        os.rename(target, p.old)
        try:
            _crashpoint("folder:after-aside")
            os.rename(p.new, target)
        except BaseException:
            os.rename(p.old, target)  # (a SIGKILL never gets here; `recover` does this then)
            raise
        swapped = True
        _crashpoint("folder:after-rename")
        fsync_dir(target.parent)
        fsync_dir(p.old.parent)
        _crashpoint("folder:after-dir-fsync")
        return p.old
    except BaseException:
        if not swapped:
            remove_tree(p.new)
        raise


def create(target: Path, area: Path, build: Callable[[Path], None], mode: int) -> None:
    """Make a folder at `target`, where there is none, from what `build(folder)` fills: built
    whole where `swap` builds, then renamed in, so a reader finds no folder or the whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    p = places(target, area)
    remove_tree(p.new)
    try:
        os.mkdir(p.new, 0o700)
        build(p.new)
        os.chmod(p.new, mode)
        fsync_dir(p.new)
        fsync_dir(p.new.parent)
        if os.path.lexists(target):
            raise TargetChanged(f"{target}: appeared while lorad was writing it; left as it is")
        os.rename(p.new, target)
        fsync_dir(target.parent)
    except BaseException:
        remove_tree(p.new)
        raise


def remove(target: Path, area: Path) -> None:
    """Remove a folder whole: moved out of the way first, so a reader never finds part of it."""
    p = places(target, area)
    remove_tree(p.old)
    os.rename(target, p.old)
    fsync_dir(target.parent)
    remove_tree(p.old)


def dir_mode_owner(target: Path) -> tuple[int, tuple[int, int] | None]:
    """The replaced folder's permissions (and owner, when we may set it)."""
    st = os.stat(target)
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    return st.st_mode & 0o7777, owner
