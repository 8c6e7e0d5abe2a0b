"""Fleet faults with real daemons on a real PostgreSQL server: `lorad drain` on the node that watches
the folder while it runs a slow job, and PostgreSQL stopped and started again under two running
daemons. Every wait polls `lorad status` or the records; nothing sleeps a fixed time."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from lorad.daemon.queue import Queue
from lorad.library.db import migrate
from lorad.library.db.session import Database, DatabaseLost, Health, unreachable
from tests._daemon_fixtures import Daemon, cli_here, cli_json, make_lora, wait_for
from tests._pg import OwnPgServer, pg_own_server, pg_server, pg_url  # noqa: F401  (fixtures)
from tests.test_fleet import _node, _reduced_everywhere, _status, _watcher

LEASE = 3.0
SETTLE = 0.3


def _nodes_by_name(d: Daemon) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in _status(d)["fleet"]["nodes"]}


def _events(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == event]


def _one_done_job_and_one_reduction_each(url: str, loras: list[dict[str, Any]]) -> None:
    """Every LoRA: exactly one job, done; exactly one reduced variant, active."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(sa.text("SELECT lora_id, state FROM jobs")).all()
            reduced = dict(conn.execute(sa.text(
                "SELECT lora_id, count(*) FROM variants WHERE kind = 'reduced' GROUP BY lora_id")).all())  # fmt: skip
    finally:
        engine.dispose()
    ids = sorted(x["id"] for x in loras)
    assert sorted(lid for lid, _ in jobs) == ids, jobs  # one job per file: none lost, none twice
    assert {state for _, state in jobs} == {"done"}, jobs
    assert reduced == {i: 1 for i in ids}, reduced


def _stop_all(nodes: list[Daemon]) -> None:
    for d in nodes:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)


# -- the database's health, without daemons ---------------------------------------------------------


def test_a_lost_database_is_said_once_each_way_and_a_stale_answer_changes_nothing():
    health = Health("postgresql+psycopg://lorad:secret@db/lorad")
    back: list[bool] = []
    health.on_back(lambda: back.append(True))
    with capture_logs() as logs:
        health.lost(OSError("connection refused"), began=time.monotonic())
        health.lost(OSError("connection refused again"), began=time.monotonic())  # the same outage
        health.fine(began=time.monotonic() - 60)  # a transaction begun before the outage: says nothing
        assert health.reachable is False and back == []
        doc = health.to_json()
        assert doc["reachable"] is False and doc["since"] and doc["error"] == "connection refused again"
        assert "secret" not in doc["url"] and doc["outages"] == 1
        health.fine(began=time.monotonic())
        health.fine(began=time.monotonic())
        health.lost(OSError("late"), began=time.monotonic() - 60)  # begun in the outage just ended
        assert health.reachable is True and back == [True]
    said = [(e["event"], e.get("database")) for e in logs if e["event"].startswith("database")]
    assert said == [("database unreachable, retrying", "postgresql+psycopg://lorad:***@db/lorad"),
                    ("database reachable again", "postgresql+psycopg://lorad:***@db/lorad")]  # fmt: skip


def test_the_outage_line_hides_a_password_that_the_driver_s_message_quotes():
    """A driver's message may quote the connection details it was given (libpq quotes a URI it
    cannot parse): the outage line and `lorad status` hide the password in it, as the start-up
    refusal does."""
    password = "s3cret-of-the-fleet"
    url = f"postgresql+psycopg://lorad:{password}@db/lorad"
    with pytest.raises(psycopg.Error) as driver:
        psycopg.connect(f"postgresql://lorad:{password}@[db/lorad")
    assert password in str(driver.value)  # the driver's own words
    health = Health(url)
    with capture_logs() as logs:
        health.lost(driver.value, began=time.monotonic())
    [line] = [e for e in logs if e["event"] == "database unreachable, retrying"]
    assert "IPv6 host address in URI" in line["error"] and "postgresql://lorad:***@[db/lorad" in line["error"]
    assert password not in json.dumps(logs) and password not in json.dumps(health.to_json())
    assert health.to_json()["error"] == line["error"]
    assert password not in str(unreachable(url, driver.value))


def test_a_stopped_server_is_database_lost_and_its_return_is_noticed(pg_own_server: OwnPgServer):
    url = pg_own_server.create_database("lorad_health")
    migrate.upgrade(url)
    db = Database(url)
    try:
        queue = Queue(db)
        assert queue.counts()["pending"] == 0
        pg_own_server.stop()
        with pytest.raises(DatabaseLost, match="lorad_health"):
            queue.claim("w")
        assert db.health.reachable is False
        pg_own_server.start()
        assert queue.counts()["pending"] == 0  # the pool's dead connections replaced, not failed
        assert db.health.reachable is True and db.health.outages == 1
    finally:
        db.close()


# -- drain -----------------------------------------------------------------------------------------


def test_drain_finishes_the_running_job_claims_nothing_and_hands_the_folder_over(tmp_path, pg_url):
    folder, store = tmp_path / "loras", tmp_path / "store"
    folder.mkdir()
    # a's jobs are slow (three modules, 1.5 s each), so the drain lands while one runs.
    a = _node(tmp_path, "a", folder, store, pg_url, 1.5)
    b = _node(tmp_path, "b", folder, store, pg_url, 0.02)
    try:
        a.start()  # first up: it takes the folder
        b.start()
        cli_here(b.config, "pause")  # the first file's job is a's
        assert _watcher(b) == "a"
        first = make_lora(folder / "first.safetensors", seed=1)
        running = wait_for(lambda: _status(a)["running"], 60, 0.1, "a running the first job")
        cli_here(b.config, "resume")

        reply = cli_json(a.config, "drain")
        drained_at = time.monotonic()
        assert reply["draining"] is True and reply["folders_given_up"] == [str(folder)]
        assert [j["job"] for j in reply["running"]] == [running[0]["job"]]  # drained mid-job
        mine = _status(a)
        assert mine["draining"] is True and mine["fleet"]["folders"][0]["here"] is False
        code, text, _ = cli_here(a.config, "status")
        assert code == 0 and "DRAINING" in text, text

        # The other node takes the folder within the lease (at its next renewal, in fact).
        wait_for(lambda: _watcher(b) == "b", LEASE, 0.1, "b to take the drained folder")
        assert time.monotonic() - drained_at <= LEASE
        assert _nodes_by_name(b)["a"]["draining"] is True and _nodes_by_name(b)["b"]["draining"] is False

        # Files dropped now are b's to take in and to reduce.
        later = [make_lora(folder / f"later-{i}.safetensors", seed=10 + i) for i in range(3)]
        # --wait returns once a's running job is done (recorded, and activated by its policy).
        code, out, err = cli_here(a.config, "drain", "--wait", "--timeout", "60")
        assert code == 0 and "running: nothing" in out, (out, err)
        assert _status(a)["running"] == []
        loras = wait_for(lambda: _reduced_everywhere(b, [first, *later]), 60, 0.3, "every file reduced")
        _one_done_job_and_one_reduction_each(pg_url, loras)
        started_on_a = [e["job"] for e in _events(a, "job started")]
        assert started_on_a == [running[0]["job"]], started_on_a  # a claimed nothing after the drain
        assert len(_events(a, "job done")) == 1
        assert _watcher(a) == "b" and _status(a)["fleet"]["folders"][0]["here"] is False

        # resume ends the drain; the folder stays b's while b's lease lives.
        assert cli_json(a.config, "resume") == {"paused": False, "draining": False}
        wait_for(lambda: _nodes_by_name(b)["a"]["draining"] is False, LEASE * 2, 0.1, "a's row no longer draining")
        assert _watcher(a) == "b"
    finally:
        _stop_all([a, b])


# -- PostgreSQL lost mid-run -----------------------------------------------------------------------


def _database(d: Daemon) -> dict[str, Any]:
    return _status(d)["database"]  # type: ignore[no-any-return]


def test_postgresql_stopped_and_started_mid_run_loses_no_file_and_no_job(tmp_path, pg_own_server: OwnPgServer):
    url = pg_own_server.create_database("lorad_outage")
    folder, store = tmp_path / "loras", tmp_path / "store"
    folder.mkdir()
    # a reduces slowly (a job runs when the server stops), b quickly.
    a = _node(tmp_path, "a", folder, store, url, 1.0)
    b = _node(tmp_path, "b", folder, store, url, 0.02)
    nodes = [a, b]
    try:
        a.start()
        b.start()
        before = [make_lora(folder / f"before-{i}.safetensors", seed=i) for i in range(6)]
        wait_for(lambda: _status(a)["running"] and _status(b)["queue"]["done"] >= 1, 60, 0.1,
                 "a running a job, and one job done")  # fmt: skip

        pg_own_server.stop()
        for d in nodes:  # status answers, and says so
            db = wait_for(lambda d=d: (x := _database(d))["reachable"] is False and x, 30, 0.1,
                          f"{d.config.parent.name} to notice the database gone")  # fmt: skip
            assert db["since"] and db["error"] and "lorad_outage" in db["url"], db
            code, text, _ = cli_here(d.config, "status")
            assert code == 0 and "database: UNREACHABLE" in text, text
        during = [make_lora(folder / f"during-{i}.safetensors", seed=100 + i) for i in range(3)]
        # a's job ends meanwhile: its outcome cannot be recorded, so it is neither done nor activated.
        wait_for(lambda: not _status(a)["running"], 30, 0.1, "a's running job to end")
        # An outage longer than the lease: no node can show it, so none watches the folder.
        for d in nodes:
            wait_for(lambda d=d: not _status(d)["fleet"]["folders"][0]["here"], LEASE * 2, 0.1,
                     f"{d.config.parent.name} to stop watching")  # fmt: skip
        assert _database(a)["reachable"] is False and _database(b)["reachable"] is False

        pg_own_server.start()
        for d in nodes:
            wait_for(lambda d=d: _database(d)["reachable"], 30, 0.1, f"{d.config.parent.name} to see the database back")
        after = make_lora(folder / "after.safetensors", seed=999)
        paths = [*before, *during, after]
        loras = wait_for(lambda: _reduced_everywhere(b, paths), 90, 0.3, "every file reduced and activated")
        assert len(loras) == len(paths)
        _one_done_job_and_one_reduction_each(url, loras)
        assert cli_json(a.config, "list") == cli_json(b.config, "list")

        for d in nodes:  # said once each way, with the URL (no password in it to hide here)
            gone, back = _events(d, "database unreachable, retrying"), _events(d, "database reachable again")
            assert len(gone) == 1 and len(back) == 1, (gone, back, d.log_tail())
            assert "lorad_outage" in gone[0]["database"] and gone[0]["error"]
            assert not [e for e in d.log_events() if e.get("level") in ("error", "critical")], d.log_tail(120)
            status = _status(d)
            assert status["database"]["reachable"] is True and status["database"]["outages"] == 1
        report = cli_json(a.config, "verify")
        assert report["ok"] is True and report["missing"] == [] and report["corrupt"] == []
    finally:
        _stop_all(nodes)
