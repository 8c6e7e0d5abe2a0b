"""A library of many small LoRAs: first ingest, `lorad list`, restart, daemon memory.

    .venv/bin/python benchmarks/many_files_library.py [--files 10000] [--keep]

Builds N small LoRAs (kohya keys, 8 modules, rank 16, each file distinct), starts the real
`lorad daemon` on a temporary config whose reduction window is closed (every file is ingested and
its job queued, none is reduced: the figures are the library's, not the engine's), moves the files
into the watched folder in one burst and measures:
  - first ingest: from the burst until `lorad status` counts N LoRAs and no file is pending;
  - `lorad list` wall time (the table, --json, and the table sorted by saving), the real command
    in its own process, median of 3 (the interpreter's start, measured alone with `lorad --help`,
    is printed beside it);
  - restart: SIGTERM, start again, time from the new process's start until its first reconcile
    scan is done and no file is pending, and how many files that restart hashed;
  - the daemon's peak RSS (VmHWM) in each run, with its children's (reduction processes) if any.
Figures are printed, not asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from safetensors.numpy import save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._wait import wait_until  # noqa: E402

from lorad.daemon.control.client import Client, DaemonNotRunning  # noqa: E402
from tests._daemon_fixtures import lorad_env  # noqa: E402

MODULES, RANK, DIM = 8, 16, 32


def lora_file(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(MODULES):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{i}"
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((DIM, RANK), dtype=np.float32)
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((RANK, DIM), dtype=np.float32)
        tensors[f"{name}.alpha"] = np.array(float(RANK), dtype=np.float32)
    path.write_bytes(save(tensors, metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK)}))


def write_config(tmp: Path) -> Path:
    # A window that opens hours from now: jobs are queued and wait, so nothing is reduced.
    start = datetime.now() + timedelta(hours=6)
    end = start + timedelta(minutes=1)
    config = tmp / "lorad.yaml"
    config.write_text(f"""\
state_dir: {tmp / 'state'}
socket: {tmp / 'run' / 'lorad.sock'}
device: cpu
settle_seconds: 1
workers: 1
watch:
  - path: {tmp / 'loras'}
    policy: default
policies:
  default:
    method: rank
    param: 4
schedule:
  reconcile_every: 1h
  gc_every: off
  window: "{start:%H:%M}-{end:%H:%M}"
""")
    return config


def peak_rss_mib(pid: int) -> float:
    """VmHWM of the process plus that of its live children (kernel-tracked: no sampling)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def status(sock: Path) -> dict | None:
    try:
        return Client(sock, timeout=60).call("status")
    except (DaemonNotRunning, OSError):
        return None



def start_daemon(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=lorad_env(), cwd=str(REPO))


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)


def settled(sock: Path, n: int, reconciles: int = 1) -> dict | None:
    """The status once N LoRAs are recorded, the first reconcile scan is done and nothing waits to be
    taken in."""
    s = status(sock)
    if s and s["loras"] == n and s["reconciles"] >= reconciles and s["pending_files"] == 0 and not s.get("ingesting"):
        return s
    return None


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, env=lorad_env(), cwd=str(REPO))
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    n = args.files

    tmp = Path(tempfile.mkdtemp(prefix="lorad-library-"))
    config = write_config(tmp)
    sock = tmp / "run" / "lorad.sock"
    staging, watched = tmp / "staging", tmp / "loras"
    staging.mkdir()
    print(f"making {n} LoRAs ({MODULES} modules, rank {RANK}) in {staging} ...", flush=True)
    for i in range(n):
        lora_file(staging / f"lora-{i:05d}.safetensors", seed=i)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

    figures: dict[str, object] = {"files": n}
    log_path = tmp / "daemon.log"
    daemon = start_daemon(config, log_path)
    try:
        wait_until(lambda: status(sock), 120)
        start = time.monotonic()
        for f in sorted(staging.iterdir()):  # one burst; same filesystem: each arrives whole
            os.rename(f, watched / f.name)
        wait_until(lambda: settled(sock, n), args.timeout, 0.5)
        figures["first_ingest_s"] = round(time.monotonic() - start, 2)
        figures["first_ingest_files_per_s"] = round(n / (time.monotonic() - start), 1)
        figures["ingest_peak_rss_mib"] = round(peak_rss_mib(daemon.pid), 1)

        lorad = [sys.executable, "-m", "lorad"]
        figures["load_average_at_list"] = round(os.getloadavg()[0], 2)
        figures["interpreter_start_s"] = round(statistics.median(timed([*lorad, "--help"]) for _ in range(3)), 3)
        for name, extra in (("list", []), ("list_json", ["--json"]), ("list_sort_saved", ["--sort", "saved"])):
            runs = [timed([*lorad, "list", "--config", str(config), *extra]) for _ in range(3)]
            figures[f"{name}_s_median_of_3"] = round(statistics.median(runs), 3)
            figures[f"{name}_runs_s"] = [round(r, 3) for r in runs]
        listed = json.loads(subprocess.run([*lorad, "list", "--config", str(config), "--json"], check=True,
                                           capture_output=True, text=True, env=lorad_env(), cwd=str(REPO)).stdout)
        figures["list_entries"] = len(listed)
        figures["list_json_bytes"] = len(json.dumps(listed))
        figures["daemon_peak_rss_mib"] = round(peak_rss_mib(daemon.pid), 1)
        hashed_before = (status(sock) or {}).get("files_hashed")
        stop_daemon(daemon)

        figures["load_average_at_restart"] = round(os.getloadavg()[0], 2)
        start = time.monotonic()
        daemon = start_daemon(config, log_path)
        final = wait_until(lambda: settled(sock, n), args.timeout, 0.1)
        figures["restart_to_first_reconcile_s"] = round(time.monotonic() - start, 2)
        figures["restart_hashed_files"] = final.get("files_hashed")
        figures["restart_peak_rss_mib"] = round(peak_rss_mib(daemon.pid), 1)
        figures["first_run_hashed_files"] = hashed_before
    finally:
        if daemon.poll() is None:
            stop_daemon(daemon)

    print(json.dumps(figures, indent=2))
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
