"""Opening files that a user (or anyone who can write to a watched folder) put there.

A FIFO named `x.safetensors` blocks `open()` until a writer appears, and a device or socket is no
LoRA either. So nothing in lorad opens such a path with a plain `open`: `open_regular` opens with
O_NONBLOCK (which never blocks, whatever the file is), checks with fstat that it IS a regular file,
and only then hands back a normal blocking file object.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from lorad.errors import NotRegularFileError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))  # fmt: skip


def describe_mode(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike[str]) -> os.stat_result:
    """stat (following symlinks) and refuse anything but a regular file, without opening it."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"{path}: {describe_mode(st.st_mode)}, not a regular file; lorad never opens those")
    return st


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading, or raise NotRegularFileError; never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                f"{Path(path)}: {describe_mode(st.st_mode)}, not a regular file; lorad never opens those"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
