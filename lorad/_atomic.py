"""Temp-then-rename writes: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


TEMP_SUFFIX = ".lorad-tmp"


def temp_name(target: Path) -> Path:
    """A sibling name no LoRA loader lists (a dot-file without the .safetensors suffix)."""
    return target.with_name(f".{target.name}{TEMP_SUFFIX}")


def is_temp_name(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success rename it over `target` and fsync the folder.

    The caller writes (and fsyncs) the temp file or directory. On any error the temp is removed
    and `target` is untouched.
    """
    tmp = temp_name(target)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            _swap_dirs(tmp, target)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        _remove(tmp)
        raise


def _swap_dirs(new: Path, target: Path) -> None:
    # Directories cannot be renamed over a non-empty one: move the old aside first.
    old = target.with_name(f".{target.name}.lorad-old")
    _remove(old)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
