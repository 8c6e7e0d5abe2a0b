"""Many files: drop N small LoRAs into the running daemon at once and time it end to end.

    .venv/bin/python benchmarks/many_files.py [--files 1000] [--workers 1] [--modules 8] [--rank 16]

Starts `lorad daemon` in a subprocess on a temporary config, renames N LoRAs (kohya layout, 8
modules of rank 16 by default) into its watched folder in one burst, and waits until the queue is
drained. Then it checks that every file was processed exactly once (one job, one attempt, done; one
reduced variant; the file at each path is that variant) and none was lost, times `lorad list`
(the table and --json, median of 3 each, through the real CLI), restarts the daemon and times it from start to its first
reconcile done, and stops it. Prints files per second, the list and restart times, and the peak RSS
of the daemon with its reduction processes (their summed RSS, sampled every 0.25 s, and the daemon's
own kernel-tracked high-water mark). Exits 1 when a check fails. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._wait import wait_until  # noqa: E402

from lorad.daemon.control.client import Client, DaemonNotRunning  # noqa: E402
from tests._daemon_fixtures import lorad_env, make_lora, write_config  # noqa: E402
from tests._proc import children  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    """The process's resident-set high-water mark, from /proc (kernel-tracked, so no sampling)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    """RSS of `pid` and its children (the reduction processes), summed."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class TreeSampler(threading.Thread):
    """The peak of tree_rss_mib, sampled every 0.25 s while the daemon runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.peak = max(self.peak, tree_rss_mib(self.pid))



def status(sock: Path) -> dict | None:
    try:
        return Client(sock, timeout=30).call("status")
    except DaemonNotRunning:
        return None


def start_daemon(config: Path, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=lorad_env(), cwd=str(REPO))


def stop_daemon(daemon: subprocess.Popen) -> int:
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(120)


def time_list(config: Path, *flags: str) -> tuple[float, str]:
    """Median wall time of `lorad list [flags]` (a fresh CLI process each, as a user runs it) and
    what the last one printed."""
    times, out = [], ""
    for _ in range(3):
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "lorad", "list", *flags, "--config", str(config)],
                             capture_output=True, check=True, text=True, env=lorad_env(), cwd=str(REPO)).stdout  # fmt: skip
        times.append(time.monotonic() - start)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--modules", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lorad-many-"))
    config = write_config(tmp, settle=args.settle, workers=args.workers, lease=30.0)
    sock = tmp / "run" / "lorad.sock"
    staging = tmp / "staging"
    print(f"making {args.files} LoRAs in {staging} ...", flush=True)
    files = [make_lora(staging / f"lora-{i:05d}.safetensors", seed=i, modules=args.modules, rank=args.rank, dim=64)
             for i in range(args.files)]  # fmt: skip
    originals = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    log_path = tmp / "daemon.log"

    daemon = start_daemon(config, log_path)
    sampler = TreeSampler(daemon.pid)
    failures: list[str] = []
    try:
        wait_until(lambda: status(sock), 120)
        sampler.start()
        watched = tmp / "loras"
        start = time.monotonic()
        for f in files:  # one burst; same filesystem, so each arrives whole (moved-to events)
            os.rename(f, watched / f.name)
        print(f"dropped {args.files} files; waiting for the queue to drain ...", flush=True)
        final = wait_until(lambda: _drained(sock, args.files), args.timeout, 1.0)
        elapsed = time.monotonic() - start
        daemon_peak = peak_rss_mib(daemon.pid)
        table_seconds, table = time_list(config)
        list_seconds, printed = time_list(config, "--json")
        listed = json.loads(printed)
        if len(table.splitlines()) < args.files:
            failures.append(f"the table has {len(table.splitlines())} lines for {args.files} LoRAs")
        failures += _check(listed, watched, originals, final)
    finally:
        sampler.stop.set()
        code = stop_daemon(daemon)
    if code != 0:
        failures.append(f"daemon exited with {code}")

    restart = time.monotonic()
    daemon = start_daemon(config, log_path)
    try:
        wait_until(lambda: (s := status(sock)) and s["reconciles"] >= 1, 600, 0.1)
        restart_seconds = time.monotonic() - restart
    finally:
        code = stop_daemon(daemon)
    if code != 0:
        failures.append(f"the restarted daemon exited with {code}")
    failures += _check_jobs(tmp / "state" / "lorad.db", args.files)

    print(json.dumps({
        "files": args.files,
        "modules": args.modules,
        "rank": args.rank,
        "workers": args.workers,
        "seconds": round(elapsed, 2),
        "files_per_second": round(args.files / elapsed, 2),
        "list_table_seconds_median_of_3": round(table_seconds, 3),
        "list_json_seconds_median_of_3": round(list_seconds, 3),
        "restart_to_first_reconcile_seconds": round(restart_seconds, 2),
        "peak_rss_mib_daemon_and_children": round(sampler.peak, 1),
        "peak_rss_mib_daemon": round(daemon_peak, 1),
        "saved_bytes": final["saved_bytes"],
        "ok": not failures,
    }, indent=2))  # fmt: skip
    print(f"\n{args.files / elapsed:.2f} files/s; list {table_seconds:.3f} s (--json {list_seconds:.3f} s); restart {restart_seconds:.2f} s; "
          f"peak RSS {sampler.peak:.1f} MiB with children ({daemon_peak:.1f} MiB the daemon alone)")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not args.keep and not failures:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)
    return 1 if failures else 0


def _drained(sock: Path, n: int) -> dict | None:
    s = status(sock)
    if s and s["loras"] == n and s["queue_depth"] == 0 and s["queue"]["done"] + s["queue"]["failed"] >= n:
        return s
    return None


def _check(listed: list[dict], watched: Path, originals: dict[str, str], final: dict) -> list[str]:
    problems = []
    if final["queue"]["failed"]:
        problems.append(f"{final['queue']['failed']} jobs failed")
    if final["queue"]["done"] != len(originals):
        problems.append(f"{final['queue']['done']} jobs done for {len(originals)} files")
    loras = {Path(x["path"]).name: x for x in listed}
    lost = sorted(set(originals) - set(loras))
    if lost:
        problems.append(f"lost: {lost[:5]}{'...' if len(lost) > 5 else ''}")
    for name, lora in loras.items():
        kinds = sorted(v["kind"] for v in lora["variants"])
        if kinds != ["original", "reduced"]:
            problems.append(f"{name}: variants {kinds}")
            continue
        original = next(v for v in lora["variants"] if v["kind"] == "original")
        active = next(v for v in lora["variants"] if v["active"])
        if original["sha256"] != originals.get(name):
            problems.append(f"{name}: the stored original is not the dropped file")
        on_disk = hashlib.sha256((watched / name).read_bytes()).hexdigest()
        if active["kind"] != "reduced" or on_disk != active["sha256"]:
            problems.append(f"{name}: the file at the path is not the active reduced variant")
    return problems


def _check_jobs(db_path: Path, n: int) -> list[str]:
    """Read-only look at the jobs table after the daemon stopped: one attempt per file."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT state, attempts, COUNT(*) FROM jobs GROUP BY state, attempts").fetchall()
    finally:
        db.close()
    if rows != [("done", 1, n)]:
        return [f"jobs by (state, attempts): {rows}, expected [('done', 1, {n})]"]
    return []


if __name__ == "__main__":
    sys.exit(main())
