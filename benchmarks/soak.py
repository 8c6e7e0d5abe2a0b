"""Soak test: files keep arriving, clients hammer the socket, and the daemon is SIGKILLed again and again.

    .venv/bin/python benchmarks/soak.py                                  # 500 files over 10 minutes
    .venv/bin/python benchmarks/soak.py --files 60 --minutes 2        # a short run

Three processes besides the daemon:
- this one drops the files (renamed in from a staging folder, evenly spread over --minutes);
- a hammer calls `status` and `list` on the socket in a loop, counting answers, refusals while
  the daemon is down, and anything else (errors);
- a keeper owns the daemon: it SIGKILLs it every --kill-every seconds (random in the range) and
  restarts it at once, from the first drop until the queue has drained.
Then the daemon's RSS is read, it is stopped with SIGTERM, and the records are checked against the
dropped files:
every original stored byte for byte (its blob re-hashed), every watched file either that original
or a recorded variant of it, no reduction process outliving the daemon that started it.

Prints files processed, kills survived, originals lost (must be 0) and the daemon's RSS at the start and the end;
exits 1 when a check fails. Figures are printed, not asserted: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lorad.daemon.control.client import Client, DaemonNotRunning  # noqa: E402
from lorad.errors import LoradError  # noqa: E402
from lorad.library.store import Store  # noqa: E402
from tests._daemon_fixtures import lorad_env, make_lora, write_config  # noqa: E402


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB from /proc (HWM: the peak since the process started)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The keeper: owns the daemon, kills and restarts it


def keeper(config: Path, log_path: Path, kill_range: tuple[float, float], seed: int, stop_killing: Any,
           stop: Any, shared: Any, pids: Any) -> None:  # fmt: skip
    rng = random.Random(seed)
    cmd = [sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"]

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=lorad_env(), cwd=str(REPO))
        shared["pid"] = proc.pid
        pids.append(proc.pid)
        return proc

    proc = start()
    while not stop.is_set():
        wait = rng.uniform(*kill_range)
        if stop_killing.wait(wait) or stop.is_set():
            break
        if proc.poll() is not None:  # it died by itself: that is a finding, not a kill
            shared["crashes"] = shared.get("crashes", 0) + 1
            proc = start()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shared["kills"] = shared.get("kills", 0) + 1
        proc = start()
    stop.wait()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            shared["exit_code"] = proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            shared["exit_code"] = "timeout"
    else:
        shared["exit_code"] = proc.returncode


# ---------------------------------------------------------------------------------------------
# The hammer: status and list in a loop


def hammer(sock: Path, stop: Any, shared: Any) -> None:
    ok = down = errors = 0
    worst = 0.0
    last_error = ""
    while not stop.is_set():
        for method in ("status", "list"):
            started = time.monotonic()
            try:
                with Client(sock, timeout=30) as client:
                    client.call(method)
                ok += 1
                worst = max(worst, time.monotonic() - started)
            except DaemonNotRunning:
                down += 1
                time.sleep(0.05)
            except (LoradError, OSError, ValueError) as e:
                errors += 1
                last_error = f"{method}: {type(e).__name__}: {e}"
                time.sleep(0.05)
        shared.update(ok=ok, down=down, errors=errors, worst_seconds=round(worst, 3), last_error=last_error)


# ---------------------------------------------------------------------------------------------
# Checks after the run


def check(state: Path, watched: Path, originals: dict[str, str]) -> dict[str, Any]:
    """Read-only look at the records and the store after the daemon stopped."""
    db = sqlite3.connect(f"file:{state / 'lorad.db'}?mode=ro", uri=True)
    try:
        loras = {Path(p).name: (lid, ov) for lid, p, ov in db.execute("SELECT id, path, original_variant_id FROM loras")}
        variants = {}
        for vid, lid, blob in db.execute("SELECT id, lora_id, blob_sha256 FROM variants"):
            variants[vid] = (lid, blob)
        jobs = db.execute("SELECT state, attempts, COUNT(*) FROM jobs GROUP BY state, attempts").fetchall()
        errors = [e for (e,) in db.execute("SELECT error FROM jobs WHERE state = 'failed'")]
    finally:
        db.close()
    lost, wrong_file = [], []
    for name, dropped_sha in originals.items():
        record = loras.get(name)
        if record is None or record[1] not in variants:
            lost.append(f"{name}: no original recorded")
            continue
        lora_id, original_variant = record
        blob_sha = variants[original_variant][1]
        blob = Store(state / "store").path_of(blob_sha)
        if blob_sha != dropped_sha or not blob.is_file() or sha256(blob) != dropped_sha:
            lost.append(f"{name}: the stored original is not the dropped file")
            continue
        path = watched / name
        on_disk = sha256(path) if path.is_file() else None
        known = {blob for lid, blob in variants.values() if lid == lora_id}
        if on_disk not in known:
            wrong_file.append(f"{name}: the watched file is neither the original nor a recorded variant")
    return {"lost": lost, "wrong_file": wrong_file, "jobs": jobs, "failed_errors": errors[:5]}


def orphans(daemon_pids: list[int]) -> list[int]:
    """Reduction processes still alive that any of our daemons started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lorad.daemon._reduce_child" in argv and b"--parent" in argv:
            parent = int(argv[argv.index(b"--parent") + 1])
            if parent in daemon_pids:
                found.append(int(entry.name))
    return found


def status(sock: Path) -> dict[str, Any] | None:
    try:
        with Client(sock, timeout=30) as client:
            return client.call("status")
    except (LoradError, OSError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=10.0, help="spread the drops over this long")
    ap.add_argument("--kill-every", default="40:90", help="seconds between SIGKILLs, MIN:MAX (random)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--nice", type=int, help="the reduction process's niceness (default: the config default, 10); "
                    "0 on a shared machine where others' processes would starve a polite reduction")
    ap.add_argument("--drain-timeout", type=float, default=3600.0, help="seconds to wait for the queue after the drops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    low, high = (float(x) for x in args.kill_every.split(":"))

    tmp = Path(tempfile.mkdtemp(prefix="lorad-soak-"))
    config = write_config(tmp, settle=0.5, workers=args.workers, lease=10.0)
    if args.nice is not None:
        with open(config, "a") as f:
            f.write(f"nice: {args.nice}\n")
    sock, state, watched, staging = tmp / "run" / "lorad.sock", tmp / "state", tmp / "loras", tmp / "staging"
    print(f"soak in {tmp}: {args.files} files over {args.minutes} min, SIGKILL every {low:g}-{high:g} s", flush=True)
    rng = random.Random(args.seed)
    files = [make_lora(staging / f"soak-{i:04d}.safetensors", seed=i, modules=rng.choice((3, 6, 12)),
                       dim=rng.choice((32, 48, 64))) for i in range(args.files)]  # fmt: skip
    originals = {f.name: sha256(f) for f in files}

    manager = mp.Manager()
    shared, hammered, pids = manager.dict(), manager.dict(), manager.list()
    stop_killing, stop, stop_hammer = mp.Event(), mp.Event(), mp.Event()
    keep = mp.Process(target=keeper, args=(config, tmp / "daemon.log", (low, high), args.seed, stop_killing, stop, shared, pids))
    keep.start()
    deadline = time.monotonic() + 120
    while status(sock) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not come up; see {tmp / 'daemon.log'}")
        time.sleep(0.2)
    first = shared.get("pid")
    rss_at_start = proc_status(first) if first else {}  # up and answering, before any file
    ham = mp.Process(target=hammer, args=(sock, stop_hammer, hammered))
    ham.start()

    started = time.monotonic()
    gap = args.minutes * 60 / max(1, args.files)
    for i, f in enumerate(files):
        time.sleep(max(0.0, started + i * gap - time.monotonic()))
        os.rename(f, watched / f.name)
    dropped_at = time.monotonic()
    print(f"dropped {args.files} files in {dropped_at - started:.0f}s; {shared.get('kills', 0)} kills so far; draining ...",
          flush=True)  # fmt: skip

    final = None
    drain_deadline = time.monotonic() + args.drain_timeout
    while time.monotonic() < drain_deadline:
        s = status(sock)
        if s and s["loras"] >= args.files and s["queue_depth"] == 0 and s["queue"]["done"] + s["queue"]["failed"] >= args.files:
            final = s
            break
        time.sleep(1.0)
    drained_at = time.monotonic()
    stop_killing.set()
    stop_hammer.set()
    ham.join(60)
    pid = shared.get("pid")
    rss = proc_status(pid) if pid else {}
    child_pids = list(pids)
    stop.set()
    keep.join(240)
    leftover = orphans(child_pids)
    results = check(state, watched, originals)

    failures = []
    if final is None:
        failures.append(f"the queue did not drain within {args.drain_timeout:.0f}s")
    if results["lost"]:
        failures.append(f"originals lost: {results['lost'][:5]}")
    if results["wrong_file"]:
        failures.append(f"watched files wrong: {results['wrong_file'][:5]}")
    if leftover:
        failures.append(f"reduction processes outlived their daemon: {leftover}")
    if shared.get("exit_code") != 0:
        failures.append(f"the daemon exited with {shared.get('exit_code')} on SIGTERM")
    if shared.get("crashes"):
        failures.append(f"the daemon died {shared['crashes']} times without being killed")
    if hammered.get("errors"):
        failures.append(f"{hammered['errors']} socket calls failed: {hammered.get('last_error')}")
    done = sum(n for st, _a, n in results["jobs"] if st == "done")
    summary = {
        "files": args.files,
        "minutes": args.minutes,
        "files_processed": done,
        "jobs_failed": sum(n for st, _a, n in results["jobs"] if st == "failed"),
        "jobs_by_state_and_attempts": results["jobs"],
        "kills_survived": shared.get("kills", 0),
        "originals_lost": len(results["lost"]),
        "watched_files_wrong": len(results["wrong_file"]),
        "orphaned_reduction_processes": len(leftover),
        "daemon_rss_mib_at_start": round(rss_at_start.get("VmRSS", 0) / 1024, 1),
        "daemon_rss_mib_at_end": round(rss.get("VmRSS", 0) / 1024, 1),
        "daemon_peak_rss_mib_since_last_start": round(rss.get("VmHWM", 0) / 1024, 1),
        "socket_calls_answered": hammered.get("ok", 0),
        "socket_calls_while_down": hammered.get("down", 0),
        "socket_call_errors": hammered.get("errors", 0),
        "slowest_answer_seconds": hammered.get("worst_seconds"),
        "drop_seconds": round(dropped_at - started, 1),
        "drain_seconds": round(drained_at - dropped_at, 1),
        "daemon_exit_code": shared.get("exit_code"),
        "ok": not failures,
    }
    print(json.dumps(summary, indent=2))
    print(f"\n{done} of {args.files} files processed; {summary['kills_survived']} kills survived; "
          f"{summary['originals_lost']} originals lost; daemon RSS at the end {summary['daemon_rss_mib_at_end']} MiB")  # fmt: skip
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    manager.shutdown()
    if not args.keep and not failures:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
