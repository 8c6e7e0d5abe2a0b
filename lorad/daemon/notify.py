"""sd_notify over $NOTIFY_SOCKET, hand-rolled (no dependency); every call is a no-op outside systemd.

READY=1 is sent once migrations ran and the socket listens; STATUS= lines describe the queue;
WATCHDOG=1 comes from the supervisor loop only while the worker's heartbeat is fresh.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):  # abstract namespace
        return "\0" + path[1:]
    return path


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of `KEY=value` lines; True when systemd was there to receive it."""
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        except OSError:
            return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1\n" + (f"STATUS={status}\n" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def stopping(text: str = "stopping") -> bool:
    return notify(f"STOPPING=1\nSTATUS={_one_line(text)}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings systemd expects (half its WatchdogSec), or None when not asked."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def _one_line(text: str) -> str:
    return " ".join(text.split())
