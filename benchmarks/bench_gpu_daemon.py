"""GPU benchmark: the daemon on CUDA reduces a 0.9 GB SDXL LoRA, then holds no GPU memory while idle.

    .venv/bin/python benchmarks/bench_gpu_daemon.py [--input FILE] [--skip-baseline] [--keep]

Needs an NVIDIA GPU, a CUDA build of torch, and NVML (`pip install nvidia-ml-py`; without it
`nvidia-smi` is used). Without a GPU it stops at once with a message saying what is missing.

1. Makes benchmarks/out/sdxl_r128.safetensors with make_sdxl_lora.py if it is missing (986 modules,
   rank 128, fp16, 912 MB).
2. Starts `lorad daemon` with `device: cuda` (policy fro 0.9, max_rank 64) on a temporary config,
   renames a copy of the file into its watched folder, and waits for the job. While it runs it
   samples, every 0.2 s, the GPU memory of the daemon and each of its descendants (NVML's
   per-process list) and the device's used memory.
3. Prints the time to reduce (drop -> activated) with its parts from the daemon's log (settle and
   ingest, reduction process start-up, engine and record), the device the engine used, and the
   GPU memory the daemon and any child hold once idle: it must be none (each job's process exits
   and takes its CUDA context with it).
4. Unless --skip-baseline: what an in-process design would hold instead. A process reduces the
   same file on CUDA and stays alive; its GPU memory is read with torch's cache, then after
   torch.cuda.empty_cache() (the CUDA context alone, which only exiting gives back).

Exits 1 when the job fails, does not run on CUDA, or the idle daemon holds GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
DEFAULT_INPUT = OUT / "sdxl_r128.safetensors"
MIB = 1 << 20
sys.path.insert(0, str(REPO))


def fail(message: str) -> SystemExit:
    return SystemExit(f"bench_gpu_daemon: {message}")


# ---------------------------------------------------------------------------------------------
# Reading the GPU: NVML (nvidia-ml-py) or nvidia-smi


class Gpu:
    """Per-process and whole-device GPU memory of the GPU torch calls cuda:0."""

    def __init__(self) -> None:
        from lorad.daemon.gpu import _nvml_target

        self.how, self.which = _nvml_target()
        self.nvml: Any = None
        self.handle: Any = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            get = pynvml.nvmlDeviceGetHandleByUUID if self.how == "uuid" else pynvml.nvmlDeviceGetHandleByIndex
            self.handle = get(self.which)
            self.nvml = pynvml
            self.name = _text(pynvml.nvmlDeviceGetName(self.handle))
            self.source = "NVML"
        except Exception as e:  # noqa: BLE001 - ImportError or an NVMLError: try nvidia-smi
            smi = shutil.which("nvidia-smi")
            if smi is None:
                raise fail(f"no NVIDIA GPU can be read here (NVML: {type(e).__name__}: {e}; no nvidia-smi). "
                           "Run this on a CUDA machine; `pip install nvidia-ml-py` for NVML.") from None  # fmt: skip
            self.smi = smi
            try:
                self.name = self._smi("--query-gpu=name", "--format=csv,noheader")[0]
            except (subprocess.CalledProcessError, IndexError) as err:
                raise fail(f"nvidia-smi cannot read a GPU: {err}") from None
            self.source = "nvidia-smi"

    def _smi(self, *args: str) -> list[str]:
        out = subprocess.run([self.smi, "-i", str(self.which), *args], capture_output=True, text=True, check=True, timeout=30)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    def processes(self) -> dict[int, int]:
        """pid -> bytes of GPU memory, for every process with a CUDA context on this GPU (-1: the
        driver does not say how much)."""
        found: dict[int, int] = {}
        try:
            if self.nvml is not None:
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    used = p.usedGpuMemory
                    found[int(p.pid)] = -1 if used is None else int(used)
                return found
            for line in self._smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"):
                pid, used = (x.strip() for x in line.split(","))
                found[int(pid)] = int(used) * MIB if used.isdigit() else -1
        except Exception as e:  # noqa: BLE001 - a driver that will not list processes: device totals still tell
            if not getattr(self, "_warned", False):
                print(f"note: the GPU's process list cannot be read ({type(e).__name__}: {e})", file=sys.stderr)
                self._warned = True
        return found

    def used(self) -> int:
        """Bytes in use on the whole device."""
        if self.nvml is not None:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        return int(self._smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")[0]) * MIB


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def descendants(root: int) -> set[int]:
    """`root` and every process below it, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(kids)
        frontier += kids
    return found


def mib(n: float | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


# ---------------------------------------------------------------------------------------------
# Preflight


def check_torch_cuda() -> dict[str, Any]:
    """torch's CUDA build and device count, asked of a child (this process stays off the GPU)."""
    code = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'available': torch.cuda.is_available(), 'count': torch.cuda.device_count()}))")  # fmt: skip
    env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise fail(f"importing torch failed:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if not info["cuda"]:
        raise fail(f"torch {info['torch']} is a CPU build; install a CUDA build of torch to run this benchmark")
    if not info["available"]:
        raise fail(f"torch {info['torch']} (CUDA {info['cuda']}) sees no CUDA device")
    return info


def ensure_input(path: Path) -> None:
    if path.exists():
        return
    print(f"generating {path} (make_sdxl_lora.py) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "make_sdxl_lora.py"), str(path)], check=True)


# ---------------------------------------------------------------------------------------------
# The daemon


CONFIG = """\
state_dir: {tmp}/state
socket: {tmp}/run/lorad.sock
device: cuda
settle_seconds: 0.5
poll_seconds: 0.5
lease_seconds: 120
watch:
  - path: {tmp}/loras
policies:
  default:
    method: fro
    param: 0.9
    max_rank: 64
schedule:
  reconcile_every: 1h
  gc_every: off
  retry_every: off
"""


def call(sock: Path, method: str, **params: Any) -> Any:
    from lorad.daemon.control.client import Client

    with Client(sock, timeout=60) as client:
        return client.call(method, **params)


def daemon_up(sock: Path) -> bool:
    from lorad.errors import LoradError

    try:
        call(sock, "hello")
        return True
    except (LoradError, OSError):
        return False


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line[line.index("{"):])
        except (ValueError, json.JSONDecodeError):
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def at(events: list[dict[str, Any]], name: str) -> float | None:
    for e in events:
        if e.get("event") == name and "timestamp" in e:
            return datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp()
    return None


def sample(gpu: Gpu, daemon_pid: int) -> tuple[dict[int, int], int, set[int]]:
    ours = descendants(daemon_pid)
    listed = gpu.processes()
    return {pid: used for pid, used in listed.items() if pid in ours}, gpu.used(), ours


def run_daemon(gpu: Gpu, src: Path, tmp: Path, timeout: float) -> dict[str, Any]:
    (tmp / "staging").mkdir(parents=True)
    config = tmp / "lorad.yaml"
    config.write_text(CONFIG.format(tmp=tmp))
    sock, log_path = tmp / "run" / "lorad.sock", tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LORAD_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    used_before_start = gpu.used()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))  # fmt: skip
    result: dict[str, Any] = {"daemon_pid": proc.pid}
    try:
        deadline = time.monotonic() + 180
        while not daemon_up(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise fail(f"the daemon did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        held, used_idle_before, _ = sample(gpu, proc.pid)
        result["before_job"] = {"daemon_and_children_mib": {p: mib(u) for p, u in held.items()},
                                "device_used_mib": mib(used_idle_before)}  # fmt: skip

        staged = tmp / "staging" / "sdxl.safetensors"
        shutil.copyfile(src, staged)
        target = tmp / "loras" / staged.name
        dropped = time.time()
        os.rename(staged, target)
        peak_ours, peak_device, seen_children, ours_listed = 0, used_idle_before, set(), False
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            held, used, ours = sample(gpu, proc.pid)
            seen_children |= ours - {proc.pid}
            ours_listed |= bool(held)
            peak_ours = max(peak_ours, sum(max(0, u) for u in held.values()))
            peak_device = max(peak_device, used)
            try:
                jobs = call(sock, "show", target=str(target))["jobs"]
            except Exception:  # noqa: BLE001 - not ingested yet
                jobs = []
            if jobs and jobs[0]["state"] in ("done", "failed"):
                job = jobs[0]
                break
            if proc.poll() is not None:
                raise fail(f"the daemon died:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        finished = time.time()
        if job is None:
            raise fail(f"the job did not finish within {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")
        result["job"] = {k: job[k] for k in ("state", "attempts", "error")}
        result["reduce_seconds_drop_to_done"] = round(finished - dropped, 2)

        # Idle: the reduction process must be gone, and nothing of ours on the GPU.
        idle_deadline = time.monotonic() + 30
        while descendants(proc.pid) - {proc.pid} and time.monotonic() < idle_deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        idle_samples = []
        for _ in range(5):
            held, used, ours = sample(gpu, proc.pid)
            idle_samples.append((held, used, ours))
            time.sleep(1.0)
        held_idle = {p: u for h, _, _ in idle_samples for p, u in h.items()}
        events = log_events(log_path)
        settled, started = at(events, "file settled"), at(events, "job started")
        child_ready, done = at(events, "reduction process started"), at(events, "job done")
        job_done = next((e for e in events if e.get("event") == "job done"), {})
        result.update({
            "engine_device": job_done.get("device"),
            "decision": {k: job_done.get(k) for k in ("activate", "saving", "fro_retained_file", "reason")},
            "breakdown_seconds": {
                "drop_to_settled": round(settled - dropped, 2) if settled else None,
                "settled_to_job_start (ingest: hash + store 0.9 GB)": round(started - settled, 2) if settled and started else None,
                "job_start_to_process_ready (spawn, import torch)": round(child_ready - started, 2) if started and child_ready else None,
                "process_ready_to_done (CUDA init, engine, record, activate)": round(done - child_ready, 2) if child_ready and done else None,
            },
            "reduction_processes_seen": sorted(seen_children),
            "during_job": {"ours_peak_mib": mib(peak_ours), "device_peak_used_mib": mib(peak_device),
                           "our_pids_listed_by_nvml": ours_listed},
            "idle": {
                "daemon_and_children_mib": {p: mib(u) for p, u in held_idle.items()},
                "children_alive": sorted({p for _, _, o in idle_samples for p in o} - {proc.pid}),
                "device_used_mib": mib(idle_samples[-1][1]),
                "device_used_before_daemon_start_mib": mib(used_before_start),
            },
            "nvml_in_daemon": not any(e.get("event", "").startswith("NVML is not available") for e in events),
            "daemon_loaded_torch": _loads_torch(proc.pid),
        })  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                result["daemon_exit_code"] = proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["daemon_exit_code"] = "killed after 180 s"
    return result


def _loads_torch(pid: int) -> bool | None:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "libtorch" in maps or "torch/_C" in maps


# ---------------------------------------------------------------------------------------------
# Baseline: the same reduction in a process that stays alive (an in-process daemon)


BASELINE = textwrap.dedent("""
    import sys, torch
    from lorad.engine.engine import ReduceSettings, reduce_file
    report = reduce_file(sys.argv[1], sys.argv[2], ReduceSettings("fro", 0.9, max_rank=64, device="cuda"))
    print("reduced", report.device, round(report.seconds, 2), torch.cuda.memory_reserved(), flush=True)
    sys.stdin.readline()
    torch.cuda.empty_cache()
    print("emptied", torch.cuda.memory_reserved(), flush=True)
    sys.stdin.readline()
""")


def run_baseline(gpu: Gpu, src: Path, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(src), str(tmp / "baseline.safetensors")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        reduced = proc.stdout.readline().split()
        if not reduced or reduced[0] != "reduced":
            raise fail(f"the in-process baseline failed (exit {proc.wait()})")
        time.sleep(1.0)
        held_cached = gpu.processes().get(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        emptied = proc.stdout.readline().split()
        time.sleep(1.0)
        held_context = gpu.processes().get(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {
        "engine_device": reduced[1],
        "engine_seconds": float(reduced[2]),
        "torch_reserved_after_job_mib": mib(int(reduced[3])),
        "nvml_held_after_job_mib": mib(held_cached),
        "torch_reserved_after_empty_cache_mib": mib(int(emptied[1])) if len(emptied) > 1 else None,
        "nvml_held_after_empty_cache_mib": mib(held_context),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the LoRA to drop (default: generated SDXL r128)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job")
    ap.add_argument("--skip-baseline", action="store_true", help="skip the in-process comparison")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    gpu = Gpu()  # fails loudly without a GPU
    info = check_torch_cuda()
    print(f"GPU: {gpu.name} (read through {gpu.source}); torch {info['torch']} CUDA {info['cuda']}", flush=True)
    ensure_input(args.input)
    size = args.input.stat().st_size
    print(f"input: {args.input} ({size:,} B)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="lorad-gpu-bench-"))
    failures = []
    try:
        daemon = run_daemon(gpu, args.input, tmp, args.timeout)
        baseline = None if args.skip_baseline else run_baseline(gpu, args.input, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    idle = daemon["idle"]
    if daemon["job"]["state"] != "done":
        failures.append(f"the job failed: {daemon['job']['error']}")
    if daemon.get("engine_device") != "cuda" and not str(daemon.get("engine_device", "")).startswith("cuda"):
        failures.append(f"the engine ran on {daemon.get('engine_device')}, not cuda")
    if any(u != 0 for u in idle["daemon_and_children_mib"].values()) or idle["children_alive"]:
        failures.append(f"while idle the daemon holds GPU memory or children: {idle}")
    if not daemon["during_job"]["our_pids_listed_by_nvml"]:
        print("note: NVML never listed the reduction process (a container's PID namespace?); compare the "
              "device's used memory before, during and after instead", file=sys.stderr)  # fmt: skip

    print(json.dumps({"gpu": gpu.name, "input_bytes": size, "daemon": daemon, "in_process_baseline": baseline,
                      "ok": not failures}, indent=2, default=str))  # fmt: skip
    print(f"\nreduced {size / 1e9:.2f} GB on {daemon.get('engine_device')} in {daemon['reduce_seconds_drop_to_done']} s "
          f"(drop to activated); GPU memory held by the idle daemon and its children: "
          f"{sum(max(0, u or 0) for u in idle['daemon_and_children_mib'].values())} MiB "
          f"(peak during the job {daemon['during_job']['ours_peak_mib']} MiB)")  # fmt: skip
    if baseline:
        print(f"an in-process design would hold {baseline['nvml_held_after_job_mib']} MiB after the job, "
              f"{baseline['nvml_held_after_empty_cache_mib']} MiB even after empty_cache (the CUDA context)")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
