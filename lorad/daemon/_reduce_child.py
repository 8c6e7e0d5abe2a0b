"""The reduction process: the engine's runs, in a process of its own that serves jobs one after
another and exits when its stdin ends (lorad.daemon.reduction decides when: after `idle_exit`).

    python -m lorad.daemon._reduce_child --fd N --parent PID [--label L] [--nice N] [--threads N] [--io-idle]
        (one job's spec as a JSON line on stdin, per job)
    python -m lorad.daemon._reduce_child --probe-device auto             (prints cpu or cuda)
    python -m lorad.daemon._reduce_child --check-folder DIR [--nice N]   (open_lora on an adapter folder;
                                                                   prints {"ok": ...} as JSON)

The child first makes itself polite (niceness, idle I/O class, a bounded number of torch threads),
before any thread exists, so every thread torch starts later inherits it, and says `started` on
descriptor N. For each spec it runs the engine on the stored original, writes the output file where
the spec says, and reports as JSON lines: any number of `progress`, then exactly one `report` or
`error`; then it gives back what the job left in torch's caches and the C heap before waiting for
the next. An adapter folder's original is a tree in the store (lorad.library.trees): the spec's
`tree` lists its entries, which the child copies out of the store into `src` (a folder in the work
area, each blob's bytes checked on the way) before the engine reduces that folder into `dst`.
The parent (lorad.daemon.worker) records the variant and applies the policy; the child touches no
database and no watched folder.

A policy with a quality_check sends `effect` in the spec ({base, config, device}): after the
reduction the child measures the new variant against the original it just read (lorad.engine.effect,
on the job's device) and the report message carries the figures (`effect`) or why they could not be
had (`effect_error`). A diffusers base stays loaded between the jobs this process serves (keyed by
its files' names, sizes and mtimes), so a folder of new LoRAs loads it once.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import json
import os
import pickle
import platform
import signal
import sys
import time
import traceback
from typing import Any

# Test hook (like store.py's crash points): seconds to pause after each module, so end-to-end tests
# can act on a job that is surely still running. Unset in any real deployment.
MODULE_DELAY_ENV = "LORAD_TEST_MODULE_DELAY"
PROGRESS_EVERY = 0.1  # seconds between progress messages, at most
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_PR_SET_PDEATHSIG = 1
# ioprio_set / ioprio_get by architecture (not in Python's os module).
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_IDLE = 3
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}


# ---------------------------------------------------------------------------------------------
# Priority (also used by tests to read a process's I/O class back from the kernel)


def ioprio_get(pid: int) -> str | None:
    """The I/O scheduling class of `pid` as the kernel reports it, or None where unsupported."""
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(numbers[1], IOPRIO_WHO_PROCESS, pid)
    if value < 0:
        return None
    return IOPRIO_CLASSES.get(value >> IOPRIO_CLASS_SHIFT, str(value >> IOPRIO_CLASS_SHIFT))


def _ioprio_idle() -> bool:
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(numbers[0], IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT) == 0


def lower_priority(nice: int, io_idle: bool) -> dict[str, Any]:
    """Raise this process's niceness to `nice` (never lower it: under systemd Nice= may already be
    higher) and put its I/O in the idle class. Per-thread on Linux: call before threads exist."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.nice(nice - current)
    idle = _ioprio_idle() if io_idle else False
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "io_class": ioprio_get(0) or ("idle" if idle else None)}


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the daemon dies (even by SIGKILL): an orphaned reduction would go
    on holding the GPU with nobody to record its result."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


# ---------------------------------------------------------------------------------------------
# Messages


def encode_report(report: Any) -> str:
    """The Report for the parent. Pickled: the parent is the daemon that started this very code,
    so whatever fields the Report grows travel whole (no schema to keep in step)."""
    return base64.b64encode(pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def decode_report(text: str) -> Any:
    # Only ever the output of our own child, read from a pipe no one else holds.
    return pickle.loads(base64.b64decode(text))  # noqa: S301


class _Channel:
    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", encoding="utf-8", buffering=1)

    def send(self, event: str, **fields: Any) -> None:
        self._out.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self._out.flush()


def _classify(error: BaseException) -> str:
    from lorad.errors import FormatError, ReduceError, TransientError

    # TransientError first: OutputWriteError is a ReduceError too, and a full disk is not the
    # input's fault.
    if isinstance(error, TransientError):
        return "transient"
    if isinstance(error, (FormatError, ReduceError)):
        return "permanent"
    return "transient"


def serve(args: argparse.Namespace, channel: _Channel) -> None:
    applied = lower_priority(args.nice, args.io_idle)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from lorad.engine import engine  # noqa: F401 - imported once, before the first job's clock starts

    # Everything imported so far lives as long as the process: out of the collector's sight, a
    # collection costs a job's tensors, not torch's 50 ms worth of module objects.
    gc.freeze()
    channel.send("started", pid=os.getpid(), threads=torch.get_num_threads(), **applied)
    for line in sys.stdin:
        run(json.loads(line), channel)
        _release_memory(torch)


def run(spec: dict[str, Any], channel: _Channel) -> None:
    from lorad.engine.engine import ReduceSettings, reduce_file

    delay = float(os.environ.get(MODULE_DELAY_ENV) or 0)
    last = 0.0

    def progress(done: int, total: int) -> None:
        # The first module, then at most every PROGRESS_EVERY: each message wakes the daemon's
        # worker thread, which then waits its turn for the GIL behind the ingest of new files.
        nonlocal last
        now = time.monotonic()
        if done <= 1 or now - last >= PROGRESS_EVERY:
            channel.send("progress", done=done, total=total)
            last = now
        if delay:
            time.sleep(delay)

    try:
        if spec.get("tree") is not None:
            _materialize_tree(spec["tree"], spec["src"])
        report = reduce_file(spec["src"], spec["dst"], ReduceSettings(**spec["settings"]), progress=progress)
    except Exception as e:  # noqa: BLE001 - every failure goes to the parent, classified
        kind = _classify(e)
        if kind == "transient":
            traceback.print_exc(file=sys.stderr)
        channel.send("error", type=type(e).__name__, message=str(e), kind=kind)
        return
    extra: dict[str, Any] = {}
    if spec.get("effect"):
        extra = measure_effect(spec)
    channel.send("report", report=encode_report(report), **extra)


def measure_effect(spec: dict[str, Any]) -> dict[str, Any]:
    """The quality check's measurement of the variant just written against its original:
    {"effect": EffectResult JSON} or {"effect_error": why, "reusable": bool}. Never raises: a
    failed measurement refuses the variant (the parent's decision says why), it does not fail the
    job. An error that is not lorad's own (a CUDA error, a loader's crash) leaves the process unfit
    for another job: the parent then lets it go."""
    import tempfile
    from pathlib import Path

    from lorad.errors import LoradError

    gate = spec["effect"]
    # transformers warns at import about optional backends; the daemon's log is not the place
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    src, dst = Path(spec["src"]), Path(spec["dst"])
    try:
        from lorad.engine.effect import kept, run

        kept.keep_loaded(True)  # this process serves job after job: one base load for all
        with tempfile.TemporaryDirectory(prefix="lorad-effect-") as tmp:
            if src.is_dir():
                original = src
            else:  # the store's blob, read in place under a LoRA's name (loaders look at the suffix)
                original = Path(tmp) / "original.safetensors"
                os.symlink(src, original)
            config = Path(gate["config"]) if gate.get("config") else None
            result = run.measure(original, dst, Path(gate["base"]), samples=gate.get("samples"),
                                 device=gate["device"], config=config)  # fmt: skip
    except LoradError as e:
        return {"effect_error": str(e), "reusable": True}
    except Exception as e:  # noqa: BLE001 - told to the parent; this process is not used again
        traceback.print_exc(file=sys.stderr)
        return {"effect_error": f"{type(e).__name__}: {e}", "reusable": False}
    return {"effect": result.to_json()}


def _release_memory(torch: Any) -> None:
    """What a finished job leaves behind, given back before the process waits for the next: the
    blocks torch's CUDA allocator caches, and freed C heap that glibc would otherwise keep (the
    job's tensors themselves are freed by reference counting as its frames return)."""
    kept = sys.modules.get("lorad.engine.effect.kept")
    if kept is not None:  # a kept base pipeline moves off the GPU while the process waits
        kept.park_loaded()  # type: ignore[attr-defined]
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass  # not glibc


def _materialize_tree(tree: dict[str, Any], dest: str) -> None:
    """Copy a stored tree's entries ([name, sha256, mode, blob path]) into the new folder `dest`."""
    from pathlib import Path

    from lorad._fileio import open_regular
    from lorad.library import trees
    from lorad.library.store import copy_verified

    folder = Path(dest)
    folder.mkdir(mode=0o700)
    blobs = {sha: Path(blob) for _name, sha, _mode, blob in tree["entries"]}
    entries = [trees.Entry(name, sha, mode) for name, sha, mode, _blob in tree["entries"]]

    def fill(entry: trees.Entry, fd: int) -> None:
        with open_regular(blobs[entry.sha256]) as src:
            copy_verified(src, fd, entry.sha256)

    trees.write_entries(entries, folder, fill)


def check_folder(path: str, nice: int) -> dict[str, Any]:
    """open_lora on an adapter folder: {"ok": true} or {"ok": false, "type", "message"}."""
    lower_priority(nice, True)
    try:
        from lorad.engine.formats.lora import open_lora

        open_lora(path)
    except Exception as e:  # noqa: BLE001 - the verdict goes to the parent
        return {"ok": False, "type": type(e).__name__, "message": str(e)}
    return {"ok": True}


def probe_device(requested: str) -> str:
    if requested != "auto":
        return requested
    # NVML's device count instead of cuInit: the probe needs no CUDA context either.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lorad.daemon._reduce_child")
    ap.add_argument("--fd", type=int)
    ap.add_argument("--parent", type=int)
    ap.add_argument("--label", default="?", help="for ps and logs only")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--io-idle", action="store_true")
    ap.add_argument("--probe-device")
    ap.add_argument("--check-folder")
    ap.add_argument("--nice", type=int, default=10)
    args = ap.parse_args(argv)
    if args.probe_device:
        print(probe_device(args.probe_device))
        return 0
    if args.check_folder:
        print(json.dumps(check_folder(args.check_folder, args.nice)))
        return 0
    _die_with_parent(args.parent)
    # The parent decides when a job stops: a terminal's Ctrl-C or a service manager's SIGTERM to
    # the whole group must not cut a reduction the daemon means to finish within its grace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(args, _Channel(args.fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
