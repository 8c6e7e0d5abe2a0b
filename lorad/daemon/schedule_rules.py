"""When work runs: the timers and the daily window (`Schedule`, `Window`), and when the GPU counts as
busy so no job starts (`GpuBusy`), with the validation of the config's `schedule` and `gpu_busy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time
from typing import Any

from lorad.daemon._config_values import _clock, _number, parse_duration
from lorad.daemon._config_yaml import _At, _mapping

_SCHEDULE_KEYS = ("reconcile_every", "gc_every", "retry_every", "window")
_WINDOW_KEYS = ("start", "end")
_GPU_BUSY_KEYS = ("util_above", "free_below_mb", "check_every")


@dataclass(frozen=True)
class Window:
    """A daily time window (local time); `end` before `start` means it spans midnight."""

    start: time
    end: time

    def contains(self, now: time) -> bool:
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end


@dataclass(frozen=True)
class Schedule:
    reconcile_every: float | None = 3600.0  # seconds; None disables the timer
    gc_every: float | None = 86400.0
    retry_every: float | None = 900.0
    window: Window | None = None


@dataclass(frozen=True)
class GpuBusy:
    """When the GPU counts as busy (someone is generating): then no job starts. A limit of None is
    not checked."""

    util_above: float | None = 30.0  # percent; checked before every job, whatever its device
    free_below_mb: float | None = 2048.0  # MiB free; checked only for jobs that run on the GPU
    check_every: float = 5.0  # seconds between looks while busy


def _window(value: Any, at: _At) -> Window | None:
    if value is None or value == "off":
        return None
    if isinstance(value, str):  # shorthand "01:00-06:00"
        start, sep, end = value.partition("-")
        if not sep:
            raise at.error(f"expected HH:MM-HH:MM or {{start, end}}, got {value!r}")
        window = Window(_clock(start.strip(), at), _clock(end.strip(), at))
    else:
        doc = _mapping(value, at, _WINDOW_KEYS)
        for key in _WINDOW_KEYS:
            if key not in doc:
                raise at.error(f"a window needs `{key}`")
        window = Window(_clock(doc["start"], at.child(doc, "start")), _clock(doc["end"], at.child(doc, "end")))
    if window.start == window.end:
        raise at.error("the window's start and end are equal (an empty window)")
    return window


def _schedule(value: Any, at: _At) -> Schedule:
    doc = _mapping(value, at, _SCHEDULE_KEYS)
    fields: dict[str, Any] = {}
    for key in ("reconcile_every", "gc_every", "retry_every"):
        if key in doc:
            fields[key] = parse_duration(doc[key], at.child(doc, key))
    if "window" in doc:
        fields["window"] = _window(doc["window"], at.child(doc, "window"))
    return Schedule(**fields)


def _gpu_busy(value: Any, at: _At) -> GpuBusy | None:
    """off (or null): never wait; a mapping: exactly the checks it names (a missing check is off)."""
    if value is None or value is False or value == "off":
        return None
    doc = _mapping(value, at, _GPU_BUSY_KEYS)
    if not doc:
        raise at.error("name at least one of util_above, free_below_mb (or write `off`)")

    def limit(key: str, high: float | None) -> float | None:
        v = doc.get(key)
        off = v is None or v is False or v == "off"  # YAML 1.1 reads a bare off as false
        return None if off else _number(v, at.child(doc, key), 0, high)

    every = parse_duration(doc["check_every"], at.child(doc, "check_every")) if "check_every" in doc else 5.0
    return GpuBusy(util_above=limit("util_above", 100), free_below_mb=limit("free_below_mb", None),
                   check_every=every or 5.0)  # fmt: skip
