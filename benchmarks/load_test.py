"""Load test: drop many small LoRAs into a watched folder at once and time the real daemon.

    .venv/bin/python benchmarks/load_test.py [--files 200] [--workers 1] [--settle 0.5]

Starts `lorad daemon` in a subprocess on a temporary config, renames N LoRAs into its watched
folder in one burst, and waits until the queue is drained. Then it checks that every file was
processed exactly once (one job, one attempt, done; one reduced variant; the file at each path is
that variant) and none was lost, and prints files per second and the daemon's peak RSS (VmHWM).
Exits 1 when a check fails. Figures are printed, not asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lorad.daemon.control.client import Client, DaemonNotRunning  # noqa: E402
from tests._daemon_fixtures import lorad_env, make_lora, write_config  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    """The process's resident-set high-water mark, from /proc (kernel-tracked, so no sampling)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until(condition, timeout: float, every: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s")


def status(sock: Path) -> dict | None:
    try:
        return Client(sock, timeout=30).call("status")
    except DaemonNotRunning:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lorad-load-"))
    config = write_config(tmp, settle=args.settle, workers=args.workers, lease=30.0)
    sock = tmp / "run" / "lorad.sock"
    staging = tmp / "staging"
    print(f"making {args.files} LoRAs in {staging} ...", flush=True)
    files = [make_lora(staging / f"lora-{i:04d}.safetensors", seed=i) for i in range(args.files)]
    originals = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    log = open(tmp / "daemon.log", "wb")
    cmd = [sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"]
    daemon = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=lorad_env(), cwd=str(REPO))
    failures: list[str] = []
    try:
        wait_until(lambda: status(sock), 120)
        watched = tmp / "loras"
        start = time.monotonic()
        for f in files:  # one burst; same filesystem, so each arrives whole (moved-to events)
            os.rename(f, watched / f.name)
        print(f"dropped {args.files} files; waiting for the queue to drain ...", flush=True)
        final = wait_until(lambda: _drained(sock, args.files), args.timeout, 0.5)
        elapsed = time.monotonic() - start
        rss = peak_rss_mib(daemon.pid)
        failures += _check(sock, watched, originals, final)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        log.close()
    if code != 0:
        failures.append(f"daemon exited with {code}")
    failures += _check_jobs(tmp / "state" / "lorad.db", args.files)

    print(json.dumps({
        "files": args.files,
        "workers": args.workers,
        "seconds": round(elapsed, 2),
        "files_per_second": round(args.files / elapsed, 2),
        "daemon_peak_rss_mib": round(rss, 1),
        "saved_bytes": final["saved_bytes"],
        "ok": not failures,
    }, indent=2))  # fmt: skip
    print(f"\n{args.files / elapsed:.2f} files/s; daemon peak RSS {rss:.1f} MiB")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not args.keep and not failures:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)
    return 1 if failures else 0


def _drained(sock: Path, n: int) -> dict | None:
    s = status(sock)
    if s and s["loras"] == n and s["queue_depth"] == 0 and s["queue"]["done"] + s["queue"]["failed"] >= n:
        return s
    return None


def _check(sock: Path, watched: Path, originals: dict[str, str], final: dict) -> list[str]:
    problems = []
    if final["queue"]["failed"]:
        problems.append(f"{final['queue']['failed']} jobs failed")
    if final["queue"]["done"] != len(originals):
        problems.append(f"{final['queue']['done']} jobs done for {len(originals)} files")
    loras = {Path(x["path"]).name: x for x in Client(sock).call("list")}
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
