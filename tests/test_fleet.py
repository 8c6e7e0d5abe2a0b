"""Fleet roles on a real PostgreSQL server: three `lorad daemon` processes with their own state dirs
and sockets, one store_dir and one watched folder. One node watches the folder (its lease), every
node reduces; SIGKILL of the watching node hands the folder to another within the lease, SIGKILL of
a node mid-job has the job redone once elsewhere, and the records come out the same from any node.
Plus the lease rules themselves (lorad.daemon.fleet) against the database, without daemons."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lorad.daemon.fleet import Fleet
from lorad.daemon.worker import MODULE_DELAY_ENV
from lorad.library.db import migrate
from lorad.library.db.session import Database
from lorad.library.library import Library
from tests._daemon_fixtures import Daemon, cli_here, cli_json, lorad_env, make_lora, wait_for, write_config
from tests._pg import pg_server, pg_url  # noqa: F401  (fixtures)

LEASE = 3.0
SETTLE = 0.3
FILES = 60


# -- the lease rules -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    migrate.upgrade(pg_url)
    db = Database(pg_url)
    yield db
    db.close()


def _fleet(db: Database, node: str, folders: list[Path], lease: float = LEASE, **kwargs: Any) -> Fleet:
    return Fleet(db, node, folders, lease, "cpu", **kwargs)


def test_one_node_holds_a_folder_until_its_lease_expires_or_is_released(pg_db, tmp_path):
    folders = [tmp_path / "x", tmp_path / "y"]
    a, b = _fleet(pg_db, "a", folders), _fleet(pg_db, "b", folders)
    assert a.beat() == {folders[0]: True, folders[1]: True}
    assert b.beat() == {folders[0]: False, folders[1]: False}  # held and unexpired: not b's
    assert a.beat() == {folders[0]: True, folders[1]: True}  # renewed
    assert a.holding() == {folders[0]: True, folders[1]: True}
    with pg_db.write() as s:  # a's lease on x ran out (its node stalled or died)
        s.execute(sa.text("UPDATE folder_leases SET expires_at = now() - interval '1 second' WHERE folder = :f"),
                  {"f": str(folders[0])})  # fmt: skip
    assert b.beat() == {folders[0]: True, folders[1]: False}
    lost: list[Path] = []
    a._on_lose = lost.append
    assert a.beat() == {folders[0]: False, folders[1]: True}  # its renewal found b there: stops at once
    assert lost == [folders[0]] and a.holding()[folders[0]] is False
    a.release()  # a clean stop: y is free now, not after its expiry
    assert b.beat() == {folders[0]: True, folders[1]: True}
    view = b.view()
    assert [(f["path"], f["node"]) for f in view["folders"]] == [(str(f), "b") for f in folders]
    assert [n["name"] for n in view["nodes"]] == ["b"]  # a's row went with its clean stop


def test_a_node_that_cannot_renew_stops_acting_at_its_own_deadline(pg_db, tmp_path):
    clock = Clock()
    until: dict[Path, float] = {}
    a = _fleet(pg_db, "a", [tmp_path], clock=clock, on_lead=until.__setitem__)
    assert a.beat() == {tmp_path: True}
    assert until[tmp_path] == clock.now + LEASE - a.margin  # before the database's expiry
    broken = Database("postgresql+psycopg://nobody@/nowhere?host=/nonexistent&connect_timeout=1")
    a.db = broken  # the database is unreachable from here on
    clock.now += LEASE / 3
    a.beat()
    assert a.holding() == {tmp_path: True}  # still within the lease it can show
    clock.now += LEASE
    a.beat()
    assert a.holding() == {tmp_path: False}  # past it: not acting, whatever the database says
    broken.close()


def test_many_nodes_racing_for_a_free_folder_give_it_to_one(pg_url, tmp_path):
    migrate.upgrade(pg_url)
    dbs = [Database(pg_url) for _ in range(4)]
    try:
        import threading

        fleets = [_fleet(db, f"n{i}", [tmp_path]) for i, db in enumerate(dbs)]
        results: list[bool] = []
        start = threading.Barrier(len(fleets))

        def race(f: Fleet) -> None:
            start.wait()
            results.append(f.beat()[tmp_path])

        threads = [threading.Thread(target=race, args=(f,)) for f in fleets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == [False, False, False, True]
    finally:
        for db in dbs:
            db.close()


def test_activations_of_one_lora_from_two_libraries_are_serialised(pg_url, tmp_path):
    # Two nodes' libraries on one database: a put holds the LoRA's lock from reading its file
    # to recording what it wrote, so another node's put of the same LoRA waits for it.
    import threading

    from tests._store_fixtures import make_lora as store_lora
    from tests.test_library import _reduce

    root = tmp_path / "loras"
    root.mkdir()
    a = Library(tmp_path / "a", [root], database_url=pg_url, link_mode="copy", store_dir=tmp_path / "store")
    b = Library(tmp_path / "b", [root], database_url=pg_url, link_mode="copy", store_dir=tmp_path / "store")
    try:
        path = store_lora(root / "one.safetensors")
        view = a.ingest(path)
        variant, _ = _reduce(a, view.id, 2, tmp_path / "work")
        with a._serialised(view.id):  # node a is in the middle of a put of this LoRA
            done = threading.Event()
            t = threading.Thread(target=lambda: (b.activate(view.id, variant.id), done.set()))
            t.start()
            assert not done.wait(1.0)  # b waits on the database, not on a node-local lock
        t.join(30)
        assert done.is_set()
        assert b.lora(view.id).active_variant_id == variant.id == a.lora(view.id).active_variant_id
    finally:
        a.close()
        b.close()


# -- three daemons ---------------------------------------------------------------------------------


def _node(tmp: Path, name: str, folder: Path, store: Path, url: str, module_delay: float) -> Daemon:
    home = tmp / name
    home.mkdir(parents=True)
    config = write_config(home, settle=SETTLE, lease=LEASE)
    config.write_text(config.read_text().replace(f"path: {home / 'loras'}", f"path: {folder}")
                      + f"node: {name}\nstore_dir: {store}\ndatabase: {json.dumps(url)}\n")  # fmt: skip
    return Daemon(config, home / "daemon.log", env=lorad_env(**{MODULE_DELAY_ENV: str(module_delay)}))


def _status(d: Daemon) -> dict[str, Any]:
    return cli_json(d.config, "status")  # type: ignore[no-any-return]


def _watcher(d: Daemon) -> str | None:
    [folder] = _status(d)["fleet"]["folders"]
    return folder["node"]  # type: ignore[no-any-return]


def _reduced_everywhere(d: Daemon, paths: list[Path]) -> list[dict[str, Any]] | None:
    loras = [x for x in cli_json(d.config, "list") if x["id"] is not None]
    by_path = {x["path"]: x for x in loras}
    for p in paths:
        x = by_path.get(str(p))
        active = next((v for v in x["variants"] if v["active"]), None) if x else None
        if active is None or active["kind"] != "reduced":
            return None
    return loras


def test_three_nodes_one_folder_one_store(tmp_path, pg_url):
    folder, store = tmp_path / "loras", tmp_path / "store"
    folder.mkdir()
    # c's jobs are slow (one module a second), so a kill of c lands during a job.
    nodes = {name: _node(tmp_path, name, folder, store, pg_url, delay)
             for name, delay in (("a", 0.02), ("b", 0.02), ("c", 1.0))}  # fmt: skip
    try:
        nodes["a"].start()  # first up: it takes the folder's lease
        nodes["b"].start(wait_ready=False)
        nodes["c"].start(wait_ready=False)
        for name in "bc":
            wait_for(nodes[name].is_up, 60, 0.2, f"node {name} to answer")
        status = _status(nodes["b"])
        assert [n["name"] for n in status["fleet"]["nodes"]] == ["a", "b", "c"]
        assert _watcher(nodes["b"]) == "a" and _watcher(nodes["c"]) == "a"
        assert status["fleet"]["folders"][0]["here"] is False

        # 30 files, then SIGKILL of the watching node while they are being reduced.
        paths = [make_lora(folder / f"first-{i:02d}.safetensors", seed=i) for i in range(FILES // 2)]
        wait_for(lambda: _status(nodes["b"])["queue"]["done"] >= 3, 60, 0.2, "the first jobs done")
        nodes["a"].stop(signal.SIGKILL)
        killed_at = time.monotonic()
        paths += [make_lora(folder / f"after-{i:02d}.safetensors", seed=100 + i) for i in range(FILES // 2)]
        new = wait_for(lambda: _watcher(nodes["b"]) in ("b", "c") and _watcher(nodes["b"]), 30, 0.1, "another node to take the folder")
        took = time.monotonic() - killed_at
        # The lease runs out at most LEASE after a's last renewal; a node tries every LEASE / 3.
        assert took <= LEASE * 4 / 3 + SETTLE + 1.5, took
        assert _watcher(nodes["c"]) == new
        code, text, _ = cli_here(nodes["c"].config, "status")
        assert code == 0 and f"watched by {new})" in text and "NODE" in text and "HEARTBEAT" in text, text

        # SIGKILL of c in the middle of a job: the job is done once more, by b.
        def c_mid_job() -> dict[str, Any] | None:
            running = _status(nodes["c"])["running"]
            return running[0] if running and running[0]["modules_done"] < running[0]["modules_total"] else None

        job = wait_for(c_mid_job, 60, 0.1, "node c in the middle of a job")
        nodes["c"].stop(signal.SIGKILL)
        engine = sa.create_engine(pg_url)
        try:
            def state_of(job_id: int) -> tuple[str, int]:
                with engine.connect() as conn:
                    row = conn.execute(sa.text("SELECT state, attempts FROM jobs WHERE id = :id"), {"id": job_id}).one()
                return row[0], row[1]

            state, attempts = state_of(job["job"])  # (a job a's kill gave back may be on its second)
            assert state in ("running", "pending"), state
            wait_for(lambda: state_of(job["job"])[0] == "done", 60, 0.2, "the killed job redone")
            assert state_of(job["job"]) == ("done", attempts + 1)
            done_by_b = [e for e in nodes["b"].log_events() if e.get("event") == "job done" and e.get("job") == job["job"]]
            assert len(done_by_b) == 1, (job, nodes["b"].log_tail())
            assert _watcher(nodes["b"]) == "b"  # had c taken the folder, b has it now

            # a comes back: the folder stays b's (its lease is live), a reduces its share.
            nodes["a"].start()
            loras = wait_for(lambda: _reduced_everywhere(nodes["b"], paths), 90, 0.5, "every file reduced and activated")
            assert _watcher(nodes["a"]) == "b"

            # Each file reduced exactly once: one job, done, and one reduced variant per file.
            with engine.connect() as conn:
                jobs = conn.execute(sa.text("SELECT lora_id, state FROM jobs")).all()
                reduced = conn.execute(sa.text(
                    "SELECT lora_id, count(*) FROM variants WHERE kind = 'reduced' GROUP BY lora_id")).all()  # fmt: skip
                blobs = {r[0] for r in conn.execute(sa.text("SELECT sha256 FROM blobs"))}
            assert len(loras) == FILES and len(jobs) == FILES
            assert sorted(lid for lid, _ in jobs) == sorted(x["id"] for x in loras)
            assert {state for _, state in jobs} == {"done"}
            assert len(reduced) == FILES and {n for _, n in reduced} == {1}
            # No orphan blob in the shared store, and (verify below re-hashes each) no partial one:
            # a killed node's half-written temp file stays in the store's tmp/, under no address.
            on_disk = {p.name for p in (store / "objects" / "sha256").glob("*/*")}
            assert on_disk == blobs, (on_disk ^ blobs)

            # The same library from either node, and verify clean.
            assert cli_json(nodes["a"].config, "list") == cli_json(nodes["b"].config, "list")
            report = cli_json(nodes["a"].config, "verify")
            assert report["ok"] is True
            assert (report["stray"], report["missing"], report["corrupt"], report["reconciled"]) == ([], [], [], [])

            # A clean stop gives the folder up: a takes it at its next renewal, before the lease
            # would have run out.
            stopped_at = time.monotonic()
            assert nodes["b"].stop() == 0
            wait_for(lambda: _watcher(nodes["a"]) == "a", LEASE * 2, 0.1, "node a to take the released folder")
            assert time.monotonic() - stopped_at < LEASE + 1.5
            assert [n["name"] for n in _status(nodes["a"])["fleet"]["nodes"]] == ["a", "c"]  # c died: silent
            late = make_lora(folder / "late.safetensors", seed=999)
            wait_for(lambda: _reduced_everywhere(nodes["a"], [late]), 60, 0.3, "a file dropped after the handover")
        finally:
            engine.dispose()
    finally:
        for d in nodes.values():
            if d.proc is not None and d.proc.poll() is None:
                d.stop(signal.SIGKILL)
