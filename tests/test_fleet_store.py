"""Fleet mode, first pieces: `node` and `store_dir` in the config, the store's identity (in the
database and in store_dir, checked at every start), start-up faults named in one line, and one
store shared by several processes. Real SQLite, the real PostgreSQL server of tests/_pg.py, real
`lorad daemon` subprocesses."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from lorad.daemon.config import ConfigError, default_config, parse_config, with_overrides
from lorad.library import store_identity
from lorad.library.db import migrate
from lorad.library.db.session import Database
from lorad.library.library import Library
from lorad.library.store_identity import ID_FILE, StoreIdentityError
from tests._daemon_fixtures import REPO, Daemon, cli_json, lorad_env, make_lora, wait_for, write_config
from tests._pg import pg_server, pg_url  # noqa: F401  (fixtures)

# -- configuration ---------------------------------------------------------------------------------

MINIMAL = "state_dir: state\nwatch:\n  - path: loras\n"


def test_node_defaults_to_the_host_name_and_store_dir_to_the_state_dir(tmp_path):
    config = parse_config(MINIMAL, "my.yaml", tmp_path)
    assert config.node == socket.gethostname()
    assert config.store_dir is None and config.store_root == tmp_path / "state" / "store"
    moved = with_overrides(config, state_dir=tmp_path / "elsewhere")  # the default store follows
    assert moved.store_root == tmp_path / "elsewhere" / "store"
    assert default_config(state_dir=tmp_path / "s").store_root == tmp_path / "s" / "store"


def test_node_and_store_dir_are_read_and_store_dir_stays_put(tmp_path):
    config = parse_config(MINIMAL + "node: gpu-01\nstore_dir: ../shared/store\n", "my.yaml", tmp_path / "conf")
    assert config.node == "gpu-01"
    assert config.store_root == config.store_dir == tmp_path / "shared" / "store"
    assert with_overrides(config, state_dir=tmp_path / "other").store_root == tmp_path / "shared" / "store"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('""', r"line 4: node: must not be empty"),
        ('"   "', r"line 4: node: must not be empty"),
        ('"gpu\\t01"', r"line 4: node: must be printable"),
        ('" gpu-01"', r"line 4: node: must be printable, without leading or trailing spaces"),
        ("x" * 65, r"line 4: node: must be at most 64 characters, got 65"),
        ("[a, b]", r"line 4: node: expected a name"),
    ],
)
def test_a_bad_node_name_is_refused_with_its_line(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL + f"node: {value}\n", "my.yaml", tmp_path)


# -- the store's identity, on SQLite ---------------------------------------------------------------


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'lorad.db'}"
    migrate.upgrade(url)
    database = Database(url)
    yield database
    database.close()


def _row(db: Database) -> dict | None:
    with db.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM store_identity")).mappings().first()
    return None if row is None else dict(row)


def test_first_start_creates_the_id_in_both_places_and_later_starts_check_it(db, tmp_path):
    root = tmp_path / "store"
    first = store_identity.claim(db, root, "node-a")
    assert first.action == "created" and uuid.UUID(first.store_id).version == 4
    assert (root / ID_FILE).read_text() == f"{first.store_id}\n"
    assert (root / ID_FILE).stat().st_mode & 0o777 == 0o444
    row = _row(db)
    assert (row["store_id"], row["created_by"], bool(row["adopted"])) == (first.store_id, "node-a", False)
    assert row["confirmed_at"] is not None
    assert store_identity.claim(db, root, "node-b") == store_identity.Identity(first.store_id, "checked")
    assert sorted(p.name for p in root.iterdir()) == [ID_FILE]  # no temp file left beside it


def test_a_store_dir_without_the_file_is_refused_and_left_empty(db, tmp_path):
    store_identity.claim(db, tmp_path / "store", "node-a")
    expected = _row(db)["store_id"]
    share = tmp_path / "mnt" / "share"  # an unmounted share: an empty folder
    share.mkdir(parents=True)
    with pytest.raises(StoreIdentityError) as refused:
        store_identity.claim(db, share, "node-c")
    message = str(refused.value)
    assert str(share) in message and expected in message and "is the share mounted?" in message
    assert list(share.iterdir()) == []  # nothing written into it
    with pytest.raises(StoreIdentityError, match="does not exist"):  # a wrong path
        store_identity.claim(db, tmp_path / "nowhere", "node-c")
    assert not (tmp_path / "nowhere").exists()


def test_a_file_with_another_id_is_refused(db, tmp_path):
    root = tmp_path / "store"
    ours = store_identity.claim(db, root, "node-a").store_id
    theirs = str(uuid.uuid4())
    (root / ID_FILE).chmod(0o644)
    (root / ID_FILE).write_text(theirs + "\n")
    with pytest.raises(StoreIdentityError, match=f"holds store {theirs}.*database's store id is {ours}"):
        store_identity.claim(db, root, "node-a")
    (root / ID_FILE).write_text("not an id\n")
    with pytest.raises(StoreIdentityError, match="holds no store id"):
        store_identity.claim(db, root, "node-a")


def test_a_store_with_an_id_but_a_database_without_one_is_refused(db, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    (root / ID_FILE).write_text(f"{uuid.uuid4()}\n")
    with pytest.raises(StoreIdentityError, match="the database has no store id: is `database` the fleet's"):
        store_identity.claim(db, root, "node-a")
    assert _row(db) is None


def test_a_first_start_cut_short_after_the_row_writes_the_file_at_the_next(db, tmp_path):
    root = tmp_path / "store"
    with db.write() as s:  # the row made, the file never written (a kill in between)
        s.add(store_identity.StoreIdentity(id=1, store_id=str(uuid.uuid4()), adopted=False))
    written = store_identity.claim(db, root, "node-a")
    assert written.action == "written" and (root / ID_FILE).read_text().strip() == written.store_id
    assert _row(db)["confirmed_at"] is not None


def test_verify_reports_a_store_that_lost_its_id_and_touches_nothing(tmp_path):
    root = tmp_path / "loras"
    path = make_lora(root / "a.safetensors")
    store = tmp_path / "share"
    with Library(tmp_path / "state", [root], store_dir=store, link_mode="copy", check_store_identity=True) as lib:
        lib.ingest(path, policy="default", actor="test")
        assert lib.verify().ok
        (store / ID_FILE).unlink()  # the share went away under a running daemon
        report = lib.verify()
        assert not report.ok and report.blobs_checked == 0 and report.missing == ()
        assert report.store_identity and str(store) in report.store_identity and "mounted" in report.store_identity


# -- daemons ---------------------------------------------------------------------------------------


def _node_config(tmp: Path, node: str, store: Path, database: str | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp)
    with config.open("a") as f:
        f.write(f"node: {node}\nstore_dir: {store}\n")
        if database:
            f.write(f"database: {json.dumps(database)}\n")
    return config


def _refused_start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lorad", "daemon", "--config", str(config), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lorad_env(), cwd=str(REPO))  # fmt: skip


def _error_line(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None), out + err
    assert "Traceback" not in out + err, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorad: error: "), err
    return lines[0]


def _blobs(store: Path) -> list[Path]:
    return sorted(p for p in (store / "objects" / "sha256").glob("*/*") if p.is_file())


def test_a_fleet_of_daemons_on_postgresql_shares_one_store_and_refuses_a_foreign_one(tmp_path, pg_url):
    store = tmp_path / "shared-store"
    a_cfg = _node_config(tmp_path / "a", "node-a", store, pg_url)
    b_cfg = _node_config(tmp_path / "b", "node-b", store, pg_url)
    a = Daemon(a_cfg, tmp_path / "a" / "daemon.log").start()
    try:
        status = cli_json(a_cfg, "status")
        assert (status["node"], status["store_dir"]) == ("node-a", str(store))
        store_id = (store / ID_FILE).read_text().strip()
        assert status["store_id"] == store_id
        # The node's blobs go to store_dir, none under its own state dir.
        path = make_lora(tmp_path / "a" / "loras" / "style.safetensors")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wait_for(lambda: (store / "objects" / "sha256" / digest[:2] / digest).is_file(), 60, 0.1, "the original in store_dir")
        assert not (tmp_path / "a" / "state" / "store").exists()

        b = Daemon(b_cfg, tmp_path / "b" / "daemon.log").start()  # finds the id and starts
        try:
            status_b = cli_json(b_cfg, "status")
            assert (status_b["node"], status_b["store_id"], status_b["store_dir"]) == ("node-b", store_id, str(store))
            shown = subprocess.run([sys.executable, "-m", "lorad", "status", "--config", str(b_cfg)], capture_output=True,
                                   text=True, env=lorad_env(), cwd=str(REPO), timeout=60)  # fmt: skip
            assert f"node: node-b, store {store} (id {store_id})" in shown.stdout, shown.stdout + shown.stderr

            # A third node whose share is not mounted (an empty folder), and a fourth whose
            # store_dir holds another store's id: both refused at start, started side by side.
            unmounted = tmp_path / "c" / "mnt"
            unmounted.mkdir(parents=True)
            other = tmp_path / "d" / "other-store"
            other.mkdir(parents=True)
            foreign = str(uuid.uuid4())
            (other / ID_FILE).write_text(foreign + "\n")
            c = _refused_start(_node_config(tmp_path / "c", "node-c", unmounted, pg_url))
            d = _refused_start(_node_config(tmp_path / "d", "node-d", other, pg_url))
            line = _error_line(c)
            assert f"store_dir {unmounted} has no {ID_FILE} file" in line and store_id in line
            assert "is the share mounted?" in line
            assert list(unmounted.iterdir()) == []  # nothing filled in
            line = _error_line(d)
            assert f"holds store {foreign}" in line and store_id in line
            assert sorted(p.name for p in other.iterdir()) == [ID_FILE]
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0


def test_an_unreachable_postgresql_is_named_without_its_password(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cr3t-Pa55word"
    url = f"postgresql+psycopg://lorad:{secret}@127.0.0.1:{port}/lorad"
    line = _error_line(_refused_start(_node_config(tmp_path, "node-x", tmp_path / "store", url)))
    assert secret not in line
    assert f"cannot use the database postgresql+psycopg://lorad:***@127.0.0.1:{port}/lorad: " in line
    assert "refused" in line.lower()  # the cause, as the driver gives it
    assert not (tmp_path / "store").exists()


def test_an_existing_single_node_state_dir_adopts_an_id_at_start(tmp_path):
    # A store with blobs and records, made before lorad had store ids (no row, no file).
    path = make_lora(tmp_path / "loras" / "old.safetensors")
    with Library(tmp_path / "state", [tmp_path / "loras"], link_mode="copy") as lib:
        lib.ingest(path, policy="default", actor="test")
    store = tmp_path / "state" / "store"
    assert len(_blobs(store)) == 1 and not (store / ID_FILE).exists()

    config = write_config(tmp_path)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        status = cli_json(config, "status")
        assert status["store_dir"] == str(store) and status["loras"] == 1
        assert status["store_id"] == (store / ID_FILE).read_text().strip()
    finally:
        assert daemon.stop() == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'state' / 'lorad.db'}")
    with engine.connect() as conn:
        adopted = conn.execute(sa.text("SELECT store_id, adopted FROM store_identity")).one()
    engine.dispose()
    assert adopted == (status["store_id"], 1)


# -- two processes, one store ----------------------------------------------------------------------

_INGEST_CHILD = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from lorad.library.library import Library

    state, store, root, url, rounds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    who = root.name
    lib = Library(Path(state), [root], database_url=url, store_dir=Path(store), link_mode="copy",
                  migrate_on_open=False, check_store_identity=True, node=who)
    for i in range(rounds):
        # A barrier: both processes ready, then both ingest the same bytes at once.
        (root.parent / f"ready-{i}-{who}").touch()
        while len(list(root.parent.glob(f"ready-{i}-*"))) < 2:
            time.sleep(0.001)
        lib.ingest(root / f"lora-{i}.safetensors", policy="default", actor=who)
    lib.close()
    print("done")
""")


def test_two_processes_ingesting_the_same_bytes_at_once_leave_one_intact_blob(tmp_path, pg_url):
    migrate.upgrade(pg_url)  # once, before the two start
    store = tmp_path / "store"
    rounds = 4
    sources = [make_lora(tmp_path / "src" / f"{i}.safetensors", seed=i, modules=4, dim=1024, rank=256) for i in range(rounds)]
    procs = []
    for who in ("x", "y"):
        root = tmp_path / "race" / who
        root.mkdir(parents=True)
        for i, src in enumerate(sources):
            (root / f"lora-{i}.safetensors").write_bytes(src.read_bytes())
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _INGEST_CHILD, str(tmp_path / who / "state"), str(store), str(root), pg_url, str(rounds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lorad_env(), cwd=str(REPO)))  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == "done", out + err

    digests = sorted(hashlib.sha256(src.read_bytes()).hexdigest() for src in sources)
    blobs = _blobs(store)
    assert [b.name for b in blobs] == digests  # one blob per content, at its address
    for blob in blobs:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name  # whole, intact
    assert list((store / "tmp").iterdir()) == []  # no temp file left
    assert sorted(p.name for p in store.iterdir()) == ["bad", ID_FILE, "objects", "tmp"]
    assert list((store / "bad").iterdir()) == []
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.text("SELECT sha256 FROM blobs")).scalars()) == digests
        assert conn.execute(sa.text("SELECT count(*) FROM loras")).scalar() == 2 * rounds
        assert conn.execute(sa.text("SELECT count(*) FROM store_identity")).scalar() == 1
    engine.dispose()
