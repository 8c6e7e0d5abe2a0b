"""The config's small value checkers over (value, where): booleans, numbers, fractions, choices,
strings, durations, times of day, paths, database URLs, listen addresses, node names, niceness and
thread counts. Each returns the checked value or raises one ConfigError naming the key and its line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from datetime import time
from pathlib import Path
from typing import Any

from lorad.daemon._config_yaml import _At
from lorad.daemon.host_defaults import default_cpu_threads

# Where a reduction runs (the config's `device`) and where a quality check measures (its `device`).
DEVICES = ("auto", "cpu", "cuda")
NODE_MAX = 64


def _bool(value: Any, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at.error(f"expected true or false, got {value!r}")
    return value


def _number(value: Any, at: _At, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.error(f"expected a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise at.error(f"{value!r} is out of range [{low}, {high}]")
    return float(value)


def _int(value: Any, at: _At, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(f"expected a whole number, got {value!r}")
    if value < low:
        raise at.error(f"must be at least {low}, got {value}")
    return value


def _fraction(value: Any, at: _At) -> float:
    """0..1, written as 0.1 or "10%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise at.error(f"expected a fraction like 0.1 or 10%, got {value!r}") from None
    return _number(value, at, 0.0, 1.0)


def _choice(value: Any, at: _At, choices: Sequence[str]) -> str:
    if value not in choices:
        raise at.error(f"expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _string(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error(f"expected a non-empty string, got {value!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, at: _At) -> float | None:
    """Seconds from 90, 2.5, "30s", "10m", "1h", "1d"; `off`/null/0 disables (None)."""
    if value is None or value is False or value == "off" or value == 0:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value, at, 0)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise at.error(f"expected a duration like 30s, 10m, 1h, 1d or off; got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)] or None


def _clock(value: Any, at: _At) -> time:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 01:30 as 90 (base 60)
        value = f"{value // 60:02d}:{value % 60:02d}"
    try:
        hours, minutes = str(value).split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise at.error(f"expected a time of day HH:MM, got {value!r}") from None


def _path(value: Any, at: _At, base: Path) -> Path:
    text = os.path.expandvars(os.path.expanduser(_string(value, at)))
    return Path(os.path.abspath(base / text))


def _node(value: Any, at: _At) -> str:
    """A node name, as the fleet's records and `lorad status` show it: printable, at most 64."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise at.error(f"expected a name, got {value!r}")
    name = str(value)
    if not name.strip():
        raise at.error("must not be empty")
    if name != name.strip() or not name.isprintable():
        raise at.error(f"must be printable, without leading or trailing spaces; got {name!r}")
    if len(name) > NODE_MAX:
        raise at.error(f"must be at most {NODE_MAX} characters, got {len(name)}")
    return name


_LISTEN_EXAMPLE = '127.0.0.1:9466, 0.0.0.0:9466 or "[::1]:9466" (quoted: YAML reads a bare [ as a list)'
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def parse_listen(value: Any, at: _At) -> tuple[str, int] | None:
    """`host:port` (an IPv6 address in brackets) -> (host, port); off/null: None."""
    if value is None or value is False or value == "off":
        return None
    if not isinstance(value, str):
        raise at.error(f"expected host:port, e.g. {_LISTEN_EXAMPLE}; got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise at.error(f"expected [IPv6 address]:port, e.g. [::1]:9466; got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise at.error(f"{host!r} is not an IPv6 address (in {value!r})") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise at.error(f"expected host:port, e.g. {_LISTEN_EXAMPLE}; got {value!r}")
        if ":" in host:
            raise at.error(f"an IPv6 address goes in brackets, quoted: \"[{host}]:{port}\"; got {value!r}")
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise at.error(f"{host!r} is not an IPv4 address (in {value!r})") from None
        elif len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
            raise at.error(f"{host!r} is not a host name or address (in {value!r})")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise at.error(f"the port must be a number 1..65535, got {port!r} (in {value!r})")
    return host, int(port)


def listen_text(listen: tuple[str, int]) -> str:
    """(host, port) as written in the config: an IPv6 address in brackets."""
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nice(value: Any, at: _At) -> int:
    nice = _int(value, at, 0)
    if nice > 19:
        raise at.error(f"must be 0..19 (19 is the politest), got {nice}")
    return nice


def _cpu_threads(value: Any, at: _At) -> int:
    if value is None or value == "auto":
        return default_cpu_threads()
    return _int(value, at, 1)


def _database(value: Any, at: _At, base: Path) -> str:
    url = _string(value, at)
    if "://" not in url:  # a bare path means a SQLite file
        return f"sqlite:///{_path(url, at, base)}"
    return url
