"""Why lorad will not take a file: the examination of a candidate and the one-line reason it gives.

A candidate is looked at in an order that never blocks and never opens what is not a regular file:
stat (a FIFO, socket, device or directory is refused on its mode alone, unopened), then the
safetensors header through `read_header` (O_NONBLOCK + fstat). Each refusal carries a short cause
(for tables and for logging once per path and cause) and a reason a user can act on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorad._fileio import describe_mode
from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import FormatError, IncompleteError, LoradError, NotRegularFileError, PickleError
from lorad.pathtext import shown

NOT_REGULAR = "not-regular"
UNREADABLE = "unreadable"
PICKLE = "pickle"
INCOMPLETE = "incomplete"
INVALID = "invalid"
OUTSIDE = "outside"
FAILED = "failed"  # taking it in failed for a reason none of the above names
CAUSES = (NOT_REGULAR, UNREADABLE, PICKLE, INCOMPLETE, INVALID, OUTSIDE, FAILED)


@dataclass(frozen=True)
class Refusal:
    cause: str
    reason: str  # one line, without the path


def examine(path: Path, roots: Sequence[Path] = ()) -> Refusal | None:
    """None when `path` is a complete safetensors file lorad may take, else why not.

    roots: the watched folders; a symlink that leads out of all of them is refused (none given:
    not checked). A path that vanished is no refusal: FileNotFoundError goes to the caller.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return Refusal(NOT_REGULAR, f"{describe_mode(st.st_mode)}, not a regular file; lorad never opens those")
    if roots:
        outside = leads_outside(path, roots)
        if outside is not None:
            return outside
    try:
        read_header(path)
    except FormatError as e:
        return refusal_of(e, path)
    return None


def leads_outside(path: Path, roots: Sequence[Path]) -> Refusal | None:
    real = Path(os.path.realpath(path))
    if any(real != r and real.is_relative_to(r) for r in roots):
        return None
    return Refusal(OUTSIDE, f"a symlink to {shown(real)}, outside the watched folders; lorad takes only files inside them")


def refusal_of(error: BaseException, path: Path | None = None) -> Refusal:
    """The refusal an error raised while examining or taking in `path` stands for."""
    reason = _without_path(str(error), path)
    if isinstance(error, NotRegularFileError):
        return Refusal(NOT_REGULAR, reason)
    if isinstance(error.__cause__, PermissionError) or isinstance(error, PermissionError):
        return Refusal(UNREADABLE, "permission denied: lorad's user cannot read it (fix its mode or owner, then `lorad rescan`)")
    if isinstance(error, PickleError):
        return Refusal(PICKLE, reason)
    if isinstance(error, IncompleteError):
        return Refusal(INCOMPLETE, reason + "; waiting for it to change")
    if isinstance(error, FormatError):
        return Refusal(INVALID, reason)
    if isinstance(error, LoradError):
        return Refusal(FAILED, reason)
    if isinstance(error, OSError):
        return Refusal(FAILED, f"cannot read it: {error.strerror or error}")
    return Refusal(FAILED, f"{type(error).__name__}: {reason}")


def _without_path(message: str, path: Path | None) -> str:
    if path is not None:
        for prefix in (f"{path}: ", f"{shown(path)}: "):
            if message.startswith(prefix):
                return shown(message[len(prefix) :])
    return shown(message)
