"""One loaded base pipeline kept between measurements, for a process that measures again and again.

The daemon's reduction process measures after every reduction under a policy's quality_check and
serves job after job; loading the base (an SDXL pipeline: seconds, gigabytes) for each would cost
more than the reduction. With `keep_loaded(True)` the denoiser runner (lorad.engine.effect.diffusion)
keeps the last base pipeline, keyed by its files (names, sizes, mtimes, inodes: a base rewritten in
place is loaded again), and `park_loaded()` moves it to the CPU between jobs, so the GPU memory goes
back while the process waits (the process itself exits after the daemon's idle_exit). Unloading the
LoRAs leaves the pipeline as it was loaded (diffusers removes its PEFT layers); a measurement that
fails drops it. Off by default: the CLI measures once and exits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorad.engine.effect._deps import quiet
from lorad.engine.effect.base import SINGLE_FILE, Base, _files


class _Kept:
    def __init__(self) -> None:
        self.enabled = False
        self.key: tuple | None = None
        self.pipe: Any = None
        self.loads = 0  # pipelines loaded while enabled (for tests and logs)

    def take(self, base: Base, device: str, load: Callable[[Base, str], Any]) -> Any:
        """The kept pipeline if it is this base's, on `device`; else a fresh load. Either way the
        caller holds it alone until `give_back`."""
        key = files_key(base) if self.enabled else None
        pipe, self.pipe, kept_key, self.key = self.pipe, None, self.key, None
        if key is not None and key == kept_key and pipe is not None:
            with quiet():
                pipe.to(device=device)
            return pipe
        del pipe  # the old base goes before the new one loads
        if self.enabled:
            self.loads += 1
        return load(base, device)

    def give_back(self, base: Base, pipe: Any) -> None:
        """After a measurement that succeeded (a failed one is not given back: dropped)."""
        if self.enabled:
            self.key, self.pipe = files_key(base), pipe

    def park(self) -> None:
        if self.pipe is not None:
            with quiet():
                self.pipe.to(device="cpu")


def files_key(base: Base) -> tuple:
    if base.kind == SINGLE_FILE:
        assert base.config is not None
        entries = [(base.path.name, base.path), *(("config/" + n, p) for n, p in _files(base.config))]
    else:
        entries = _files(base.path)
    stats = []
    for name, path in sorted(entries):
        st = path.stat()
        stats.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return (base.kind, str(base.path.resolve()), str(base.config), tuple(stats))


KEPT = _Kept()


def keep_loaded(enabled: bool) -> None:
    """Keep the last base pipeline loaded between measurements (False: let it go now)."""
    KEPT.enabled = enabled
    if not enabled:
        KEPT.key = KEPT.pipe = None


def park_loaded() -> None:
    """Move a kept pipeline to the CPU (a process about to wait gives its GPU memory back)."""
    KEPT.park()
