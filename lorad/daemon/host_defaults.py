"""What the configuration defaults to on this host: the state folder, the socket, the database, this
node's name and the reduction's thread count.

The daemon and the client share these so both find the same socket when told nothing.
"""

from __future__ import annotations

import os
import socket as socketlib
from pathlib import Path

SOCKET_NAME = "lorad.sock"


def default_cpu_threads() -> int:
    """All the cores this process may use but one, so a foreground app keeps a core; at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if _is_root():
        return Path("/var/lib/lorad")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "lorad"


def default_socket_path(state_dir: Path | None = None) -> Path:
    """The daemon's socket when the config names none."""
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if _is_root():
        return Path("/run/lorad") / SOCKET_NAME
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "lorad" / SOCKET_NAME
    return (state_dir or default_state_dir()) / SOCKET_NAME


def default_socket_candidates() -> tuple[Path, ...]:
    """Where a client looks when told nothing: this user's default, then the system daemon's."""
    return tuple(dict.fromkeys([default_socket_path(), Path("/run/lorad") / SOCKET_NAME]))


def default_node() -> str:
    """This machine's name in a fleet when the config names none: its host name."""
    return socketlib.gethostname() or "localhost"


def default_database(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'lorad.db'}"
