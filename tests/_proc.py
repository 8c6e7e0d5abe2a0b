"""Reading processes from /proc for the tests: a daemon's reduction processes, their niceness,
environment and I/O class, as the kernel reports them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lorad.daemon._reduce_child import ioprio_get


def children(pid: int) -> list[int]:
    """Every live child of `pid` (any thread's)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def reduction_children(parent: int | None = None) -> list[int]:
    """Live (not zombie) reduction processes of `parent` (default: this test process)."""
    found = []
    for pid in children(parent or os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"lorad.daemon._reduce_child" in cmdline and state != "Z":
            found.append(pid)
    return found


def stat_nice(pid: int, tid: int | None = None) -> int:
    """Field 19 of /proc/PID[/task/TID]/stat: the niceness."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return int(Path(path).read_text().rsplit(")", 1)[1].split()[16])


def environ_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def io_class_of(pid: int) -> str:
    """The kernel's I/O class for `pid`: util-linux `ionice -p` where installed, else ioprio_get."""
    ionice = shutil.which("ionice")
    if ionice:
        return subprocess.run([ionice, "-p", str(pid)], capture_output=True, text=True, check=True).stdout.split(":")[0].strip()
    return ioprio_get(pid) or "unknown"


def alive(pid: int) -> bool:
    """Running (or sleeping): not gone, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
