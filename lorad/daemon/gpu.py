"""A busy GPU: someone is generating. The worker waits before a job while the GPU is busy.

NVML (nvidia-ml-py) reads the GPU's utilisation and free memory; without it (not installed, no
driver, no GPU) the GPU is never busy and jobs just run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorad.daemon.config import Config, GpuBusy
from lorad.log import get_logger

log = get_logger("lorad.worker")

# Test hook: a file holding "<utilisation %> <free MiB>", read instead of NVML, so tests on
# machines without a GPU can make the GPU look busy or free. Unset in any real deployment.
GPU_STATE_ENV = "LORAD_TEST_GPU_STATE"



def busy_reason(limits: GpuBusy, util: float, free_mb: float, gpu_job: bool) -> str | None:
    """Why the GPU counts as busy under `limits`, or None. Free memory matters only to a job that
    would use the GPU; utilisation means someone is generating, which a CPU job disturbs too."""
    if limits.util_above is not None and util > limits.util_above:
        return f"GPU busy (utilisation {util:.0f}% > {limits.util_above:g}%)"
    if gpu_job and limits.free_below_mb is not None and free_mb < limits.free_below_mb:
        return f"GPU busy ({free_mb:.0f} MiB free < {limits.free_below_mb:g} MiB)"
    return None


def _nvml_target() -> tuple[str, str | int]:
    """("uuid", id) or ("index", n) of the GPU torch calls cuda:0, from CUDA_VISIBLE_DEVICES
    (NVML numbers every GPU in PCI order and ignores that variable)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.startswith(("GPU-", "MIG-")):
        return "uuid", visible
    if visible.isdigit():
        return "index", int(visible)
    return "index", 0


class GpuProbe:
    """Reads the GPU's utilisation and free memory through NVML (nvidia-ml-py, `import pynvml`).
    Without NVML (not installed, no driver, no GPU) it never reports busy: lorad then just works."""

    def __init__(self, limits: GpuBusy, gpu_jobs: bool) -> None:
        self.limits = limits
        self.gpu_jobs = gpu_jobs
        self.available: bool | None = None  # None: not tried yet
        self._nvml: Any = None
        self._handle: Any = None

    def busy(self) -> str | None:
        state = self.read()
        return None if state is None else busy_reason(self.limits, state[0], state[1], self.gpu_jobs)

    def read(self) -> tuple[float, float] | None:
        """(utilisation %, free MiB), or None when unknown."""
        hook = os.environ.get(GPU_STATE_ENV)
        if hook:
            try:
                util, free = Path(hook).read_text().split()[:2]
                return float(util), float(free)
            except (OSError, ValueError):
                return None
        if self.available is None:
            self._open()
        if not self.available:
            return None
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            free = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free / (1 << 20)
            return float(util), float(free)
        except Exception as e:  # noqa: BLE001 - a GPU that cannot be read is not a busy GPU
            log.warning("reading the GPU's state failed; not waiting", error=str(e))
            return None

    def _open(self) -> None:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            how, which = _nvml_target()
            if how == "uuid":
                handle = pynvml.nvmlDeviceGetHandleByUUID(which)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(which)
        except Exception as e:  # noqa: BLE001 - ImportError, NVMLError (no driver, no GPU), ...
            self.available = False
            log.info("NVML is not available; jobs start without looking at the GPU (gpu_busy unused)",
                     error=f"{type(e).__name__}: {e}")  # fmt: skip
            return
        self._nvml, self._handle, self.available = pynvml, handle, True


def gpu_probe(config: Config, device: str) -> GpuProbe | None:
    if config.gpu_busy is None:
        return None
    # A quality check told to measure on cuda uses the GPU even when the reductions run on the CPU.
    gates = [p.quality_check.device for p in config.policies.values() if p.quality_check is not None]
    return GpuProbe(config.gpu_busy, gpu_jobs=device.startswith("cuda") or "cuda" in gates)
