"""Temp-then-rename writes: a reader sees the old file or the new one, never a partial one.

Folders are swapped whole with renameat2(RENAME_EXCHANGE) (`exchange`): both names stay bound at
every instant, so a reader that resolves the folder gets the old one or the new one. Python's `os`
has no binding for it, so it is called through ctypes; where the kernel or the filesystem does not
support it (EINVAL, ENOSYS, EOPNOTSUPP), `exchange` says so and callers fall back to moving the
old folder aside and renaming the new one in, which leaves the name unbound between the two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".lorad-tmp"
ASIDE_SUFFIX = ".lorad-old"
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
# renameat2 by architecture, for a libc older than glibc 2.28 that has no wrapper for it.
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
# Test hook: make `exchange` answer as a filesystem without RENAME_EXCHANGE does, so the fallback
# can be exercised on one that has it. Unset in any real deployment.
NO_EXCHANGE_ENV = "LORAD_TEST_NO_RENAME_EXCHANGE"


def temp_name(target: Path) -> Path:
    """A sibling name no LoRA loader lists (a dot-file without the .safetensors suffix)."""
    return target.with_name(f".{target.name}{TEMP_SUFFIX}")


def aside_name(target: Path) -> Path:
    """Where a folder's old contents wait between the two renames of a non-atomic swap."""
    return target.with_name(f".{target.name}{ASIDE_SUFFIX}")


def is_temp_name(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith((TEMP_SUFFIX, ASIDE_SUFFIX))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        fn.restype = ctypes.c_int
        return fn  # type: ignore[no-any-return]
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b, c, d, flags: int(syscall(ctypes.c_long(number), a, b, c, d, ctypes.c_uint(flags)))


def exchange(a: Path, b: Path) -> bool:
    """Swap what the names `a` and `b` point to, atomically (both must exist, on one filesystem).

    False, with nothing changed, where RENAME_EXCHANGE is not supported; any other failure raises
    OSError (nothing is changed then either)."""
    if os.environ.get(NO_EXCHANGE_ENV):
        return False
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_tree(folder: Path) -> None:
    """fsync every regular file directly in `folder`, then the folder itself."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def remove_tree(path: Path) -> None:
    """Remove a file or a folder lorad made; quietly when it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success rename it over `target` and fsync the folder.

    The caller writes (and fsyncs) the temp file or directory. On any error the temp is removed
    and `target` is untouched.
    """
    tmp = temp_name(target)
    remove_tree(tmp)
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            _swap_dirs(tmp, target)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        remove_tree(tmp)
        raise


def _swap_dirs(new: Path, target: Path) -> None:
    # A directory cannot be renamed over a non-empty one: exchange them, or move the old aside.
    fsync_tree(new)
    if exchange(new, target):
        remove_tree(new)  # the old folder, now under the temp name
        return
    old = aside_name(target)
    remove_tree(old)
    os.replace(target, old)
    os.replace(new, target)
    remove_tree(old)
