"""Fleet: N small LoRAs through 1, 2 and 3 `lorad daemon` nodes on one PostgreSQL and one store.

    .venv/bin/python benchmarks/fleet.py [--files 1000] [--nodes 1,2,3] [--modules 8] [--rank 16]

Starts Debian's PostgreSQL server in a private temp dir (as tests/_pg.py does: Unix socket only),
then for each node count: a fresh database, one store_dir, one watched folder, and that many
`lorad daemon` processes on this machine (CPU), each with its own state dir, socket and `node`
name. Renames N LoRAs (kohya layout, 8 modules of rank 16 by default) into the folder in one burst
and times it until every file has one done job. Then checks that nothing was done twice and
nothing was lost: one job per file, done (and its attempts), one reduced variant per file and it
active, the file at each path that variant, every dropped file recorded, no orphan blob; and says
how the jobs were shared between the nodes (their `job done` log lines). Prints files per second
for each node count and the load average. Figures are printed, not asserted; exits 1 when a check
fails.

On a machine with few cores the nodes share them: more nodes do not make it faster here, the
point is that the rate does not fall and that nothing is done twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._wait import wait_until  # noqa: E402

import sqlalchemy as sa  # noqa: E402

from tests import _pg  # noqa: E402
from tests._daemon_fixtures import Daemon, lorad_env, make_lora, write_config  # noqa: E402



def node(home: Path, name: str, folder: Path, store: Path, url: str, settle: float, lease: float) -> Daemon:
    home.mkdir(parents=True)
    config = write_config(home, settle=settle, lease=lease)
    config.write_text(config.read_text().replace(f"path: {home / 'loras'}", f"path: {folder}")
                      + f"node: {name}\nstore_dir: {store}\ndatabase: {json.dumps(url)}\n")  # fmt: skip
    return Daemon(config, home / "daemon.log", env=lorad_env())


def done_files(engine: sa.Engine) -> tuple[int, int]:
    """(LoRAs with a done job, jobs pending or running)."""
    with engine.connect() as conn:
        done = conn.scalar(sa.text("SELECT count(DISTINCT lora_id) FROM jobs WHERE state = 'done'"))
        live = conn.scalar(sa.text("SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')"))
    return int(done or 0), int(live or 0)


def run(n_nodes: int, staging: Path, originals: dict[str, str], server: _pg.PgServer, args: argparse.Namespace,
        number: int) -> tuple[dict, list[str]]:  # fmt: skip
    from psycopg import sql

    db_name = f"lorad_fleet_bench_{number}"
    with server.admin_connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    url = server.url(db_name)
    tmp = Path(tempfile.mkdtemp(prefix=f"lorad-fleet-{n_nodes}-"))
    folder, store = tmp / "loras", tmp / "store"
    folder.mkdir()
    batch = tmp / "batch"  # a copy on the folder's filesystem, so each rename arrives whole
    shutil.copytree(staging, batch)
    names = [chr(ord("a") + i) for i in range(n_nodes)]
    nodes = [node(tmp / name, name, folder, store, url, args.settle, args.lease) for name in names]
    engine = sa.create_engine(url)
    failures: list[str] = []
    try:
        nodes[0].start()  # first up: it migrates the database, creates the store id, takes the folder
        for d in nodes[1:]:
            d.start(wait_ready=False)
        for d in nodes[1:]:
            wait_until(d.is_up, 120, 0.2, "a node to answer")
        load_before = os.getloadavg()
        start = time.monotonic()
        for name in originals:
            os.rename(batch / name, folder / name)
        wait_until(lambda: done_files(engine) == (len(originals), 0), args.timeout, 0.5, "every file to have a done job")
        elapsed = time.monotonic() - start
        load_after = os.getloadavg()
        failures += check(engine, folder, store, originals)
        shares = Counter()
        for name, d in zip(names, nodes):
            shares[name] = sum(1 for e in d.log_events() if e.get("event") == "job done")
        for d in nodes:
            code = d.stop()
            if code != 0:
                failures.append(f"a node exited with {code}")
    finally:
        for d in nodes:
            if d.proc is not None and d.proc.poll() is None:
                d.stop(signal.SIGKILL)
        engine.dispose()
    if not args.keep and not failures:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)
    result = {
        "nodes": n_nodes,
        "files": len(originals),
        "seconds": round(elapsed, 2),
        "files_per_second": round(len(originals) / elapsed, 2),
        "jobs_done_by_node": dict(shares),
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        "ok": not failures,
    }
    return result, failures


def check(engine: sa.Engine, folder: Path, store: Path, originals: dict[str, str]) -> list[str]:
    """Nothing done twice, nothing lost."""
    problems = []
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("SELECT lora_id, state, attempts FROM jobs")).all()
        loras = {Path(p).name: (lid, active) for lid, p, active in conn.execute(
            sa.text("SELECT id, path, active_variant_id FROM loras"))}  # fmt: skip
        variants = conn.execute(sa.text("SELECT id, lora_id, kind, blob_sha256 FROM variants")).all()
        blobs = {r[0] for r in conn.execute(sa.text("SELECT sha256 FROM blobs"))}
    per_lora = Counter(lid for lid, _, _ in jobs)
    twice = [lid for lid, n in per_lora.items() if n != 1]
    if twice:
        problems.append(f"{len(twice)} LoRAs with more than one job (e.g. {twice[:5]})")
    states = Counter(state for _, state, _ in jobs)
    if states != Counter({"done": len(originals)}):
        problems.append(f"jobs by state: {dict(states)}, expected {len(originals)} done")
    attempts = Counter(a for _, _, a in jobs)
    if set(attempts) != {1}:
        problems.append(f"jobs by attempts: {dict(attempts)} (a job taken again after a lease ran out)")
    lost = sorted(set(originals) - set(loras))
    if lost:
        problems.append(f"lost: {lost[:5]}{'...' if len(lost) > 5 else ''}")
    by_id = {v.id: v for v in variants}
    reduced = Counter(v.lora_id for v in variants if v.kind == "reduced")
    for name, (lid, active) in loras.items():
        if reduced[lid] != 1:
            problems.append(f"{name}: {reduced[lid]} reduced variants")
            continue
        v = by_id.get(active)
        if v is None or v.kind != "reduced":
            problems.append(f"{name}: the active variant is not the reduced one")
            continue
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != v.blob_sha256:
            problems.append(f"{name}: the file at the path is not the active reduced variant")
        originals_of = [x.blob_sha256 for x in variants if x.lora_id == lid and x.kind == "original"]
        if originals_of != [originals[name]]:
            problems.append(f"{name}: the stored original is not the dropped file")
    on_disk = {p.name for p in (store / "objects" / "sha256").glob("*/*")}
    if on_disk != blobs:
        problems.append(f"store and records differ: {len(on_disk - blobs)} orphan files, {len(blobs - on_disk)} missing")
    return problems[:20]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--nodes", default="1,2,3", help="node counts to run, in order")
    ap.add_argument("--modules", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--lease", type=float, default=5.0, help="lease_seconds of each node")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = ap.parse_args()
    counts = [int(x) for x in args.nodes.split(",")]

    staging = Path(tempfile.mkdtemp(prefix="lorad-fleet-staging-"))
    print(f"making {args.files} LoRAs in {staging} ...", flush=True)
    files = [make_lora(staging / f"lora-{i:05d}.safetensors", seed=i, modules=args.modules, rank=args.rank, dim=64)
             for i in range(args.files)]  # fmt: skip
    originals = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    bin_dir = _pg.find_bin_dir()
    as_user = _pg._server_user()
    base = _pg._private_dir(as_user)
    results, failures = [], []
    started = time.monotonic()
    try:
        _pg._start(bin_dir, base, as_user)
        server = _pg.PgServer(base, _pg.PORT)
        for number, n in enumerate(counts, 1):
            print(f"{n} node(s): dropping {args.files} files ...", flush=True)
            result, failed = run(n, staging, originals, server, args, number)
            results.append(result)
            failures += [f"{n} node(s): {f}" for f in failed]
            print(json.dumps(result), flush=True)
    finally:
        _pg._stop(bin_dir, base, as_user)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    print(f"\n{args.files} LoRAs ({args.modules} modules, rank {args.rank}), {os.cpu_count()} CPUs, "
          f"{time.monotonic() - started:.0f} s in all:")  # fmt: skip
    for r in results:
        print(f"  {r['nodes']} node(s): {r['files_per_second']:6.2f} files/s ({r['seconds']} s); jobs done by node "
              f"{r['jobs_done_by_node']}; load average after {r['loadavg_1_5_15_after']}; "
              f"{'ok' if r['ok'] else 'FAILED'}")  # fmt: skip
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
