"""Alembic against a real SQLite file: upgrade from empty, downgrade to base, models == schema."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from lorad.library.db import migrate
from lorad.library.db.models import Base
from lorad.library.db.session import make_engine

TABLES = {"loras", "blobs", "variants", "module_metrics", "jobs", "events", "refusals", "tree_entries",
          "claimed_hashes", "variant_effects", "store_identity", "folder_leases", "nodes"}


def _tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows} - {"alembic_version"}


def _diff(url: str, metadata: sa.MetaData) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, metadata)
    finally:
        engine.dispose()


def test_script_location_is_the_top_level_migrations_folder():
    location = migrate.script_location()
    assert location.name == "migrations" and (location / "env.py").is_file()
    assert (location.parent / "lorad").is_dir()


def test_upgrade_from_empty_then_downgrade_to_base(tmp_path):
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    assert migrate.current(url) is None
    assert migrate.upgrade(url) is None  # nothing to back up: the database was empty
    assert migrate.current(url) == migrate.head() == "0009"
    assert _tables(db) == TABLES
    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    assert _tables(db) == set()
    migrate.upgrade(url)  # and back up again from base
    assert _tables(db) == TABLES


def test_models_match_the_migrated_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'lorad.db'}"
    migrate.upgrade(url)
    assert _diff(url, Base.metadata) == []


def test_the_comparison_notices_a_model_the_migrations_lack(tmp_path):
    # Guards the test above: a schema drift must show up as a difference.
    url = f"sqlite:///{tmp_path / 'lorad.db'}"
    migrate.upgrade(url)
    drifted = sa.MetaData()
    for t in Base.metadata.sorted_tables:
        t.to_metadata(drifted)
    drifted.tables["blobs"].append_column(sa.Column("colour", sa.Text()))
    diff = _diff(url, drifted)
    assert [(d[0], d[3].name) for d in diff] == [("add_column", "colour")]


def test_upgrade_backs_up_the_database_before_a_pending_migration(tmp_path):
    # A database left at revision 0001 by an older lorad meets the real 0002 (loras.file_stamp).
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    migrate.upgrade(url, "0001")
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO loras (path, folder, created_at, updated_at) "
            "VALUES ('/loras/a.safetensors', '/loras', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
        )
    backup = migrate.upgrade(url)
    assert migrate.current(url) == "0009"
    assert backup is not None and backup.parent == tmp_path and "0001-to-0009" in backup.name
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        assert conn.execute("SELECT path FROM loras").fetchall() == [("/loras/a.safetensors",)]
    with sqlite3.connect(db) as conn:  # the migration kept the data (batch move-and-copy)
        assert conn.execute("SELECT path, file_stamp FROM loras").fetchall() == [("/loras/a.safetensors", None)]
    assert migrate.upgrade(url) is None  # at head: no backup, nothing done


def _lorad(capsys, *args: str) -> tuple[int, str, str]:
    """The real `lorad` command line, in this process (a subprocess would pay torch's import)."""
    from lorad.cli.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_cli_db_current_and_upgrade(tmp_path, capsys):
    state = tmp_path / "state"
    code, _, err = _lorad(capsys, "db", "current", "--state-dir", str(state))
    assert code == 2 and "no database at" in err and "lorad db upgrade" in err
    assert not state.exists()  # looking does not create

    code, out, err = _lorad(capsys, "db", "upgrade", "--state-dir", str(state))
    assert code == 0, err
    assert out == f"sqlite:///{state / 'lorad.db'}: upgraded empty -> {migrate.head()}"
    assert _lorad(capsys, "db", "current", "--state-dir", str(state))[1] == f"{migrate.head()} (head)"
    code, out, _ = _lorad(capsys, "db", "upgrade", "--database", f"sqlite:///{state / 'lorad.db'}")
    assert out.endswith(f"already at head {migrate.head()}")
    assert _tables(state / "lorad.db") == TABLES


def test_cli_db_reports_an_unusable_database_in_one_line(tmp_path, capsys):
    bogus = tmp_path / "not-a-db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    code, _, err = _lorad(capsys, "db", "current", "--database", f"sqlite:///{bogus}")
    assert code == 2
    assert err == f"lorad: error: database sqlite:///{bogus}: file is not a database"


def test_0007_adds_variant_effects_that_go_with_their_variant_and_downgrades_cleanly(tmp_path):
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    migrate.upgrade(url, "0006")
    stamp = "'2026-01-01 00:00:00'"
    with sqlite3.connect(db) as conn:
        conn.execute(f"INSERT INTO loras (id, path, folder, created_at, updated_at) VALUES (1, '/l/a.safetensors', '/l', {stamp}, {stamp})")
        for vid, kind in ((1, "original"), (2, "reduced")):
            conn.execute("INSERT INTO blobs (sha256, bytes, data_sha256, autov2, autov3, created_at) "
                         f"VALUES ('{'a' * 63}{vid}', 1, '', 'aaaaaaaaaa', 'aaaaaaaaaaaa', {stamp})")  # fmt: skip
            conn.execute("INSERT INTO variants (id, lora_id, blob_sha256, kind, created_at) "
                         f"VALUES ({vid}, 1, '{'a' * 63}{vid}', '{kind}', {stamp})")  # fmt: skip
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA foreign_keys=ON")
        row = ("INSERT INTO variant_effects (variant_id, reference_variant_id, kind, effect_retained, effect_retained_min, "
               "per_sample, samples, samples_id, base, base_sha256, actor, measured_at) VALUES "
               "({v}, 1, 'denoiser', 0.9, 0.8, '[0.8, 1.0]', '{{}}', '{sid}', '/m', '{sha}', 'test', {stamp})")  # fmt: skip
        conn.execute(row.format(v=2, sid="0" * 16, sha="b" * 64, stamp=stamp))
        conn.execute(row.format(v=2, sid="1" * 16, sha="b" * 64, stamp=stamp))  # another sample set
        with pytest.raises(sqlite3.IntegrityError):  # one row per (variant, base, sample set)
            conn.execute(row.format(v=2, sid="0" * 16, sha="b" * 64, stamp=stamp))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(row.replace("'denoiser'", "'pixels'").format(v=2, sid="2" * 16, sha="b" * 64, stamp=stamp))
        conn.execute("DELETE FROM variants WHERE id = 2")  # gc forgets the variant: its effects go with it
        assert conn.execute("SELECT count(*) FROM variant_effects").fetchone() == (0,)
        conn.execute(row.format(v=1, sid="0" * 16, sha="b" * 64, stamp=stamp))
    migrate.downgrade(url, "0006")
    assert migrate.current(url) == "0006"
    assert _tables(db) == TABLES - {"variant_effects", "store_identity", "folder_leases", "nodes"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id, kind FROM variants").fetchall() == [(1, "original")]
    for backup in tmp_path.glob("*.bak"):  # (its name has the second: the next upgrade may be in the same one)
        backup.unlink()
    migrate.upgrade(url)
    assert _tables(db) == TABLES


def test_0008_adds_the_single_row_store_identity_and_downgrades_cleanly(tmp_path):
    # An existing database (0007, with records) gets the table empty: the daemon adopts at start.
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    migrate.upgrade(url, "0007")
    migrate.upgrade(url, "0008")
    assert migrate.current(url) == "0008"
    stamp = "'2026-01-01 00:00:00'"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM store_identity").fetchone() == (0,)
        row = "INSERT INTO store_identity (id, store_id, created_at, adopted) VALUES ({}, '{}', {}, 0)"
        conn.execute(row.format(1, "0" * 36, stamp))
        with pytest.raises(sqlite3.IntegrityError):  # one row: one store
            conn.execute(row.format(2, "1" * 36, stamp))
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(row.format(1, "1" * 36, stamp))
    migrate.downgrade(url, "0007")
    assert _tables(db) == TABLES - {"store_identity", "folder_leases", "nodes"}
    for backup in tmp_path.glob("*.bak"):
        backup.unlink()


def test_0009_adds_folder_leases_and_nodes_and_downgrades_cleanly(tmp_path):
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    migrate.upgrade(url, "0008")
    migrate.upgrade(url)
    assert migrate.current(url) == "0009"
    stamp = "'2026-01-01 00:00:00'"
    with sqlite3.connect(db) as conn:
        conn.execute(f"INSERT INTO folder_leases (folder, node, expires_at, renewed_at) VALUES ('/loras', 'a', {stamp}, {stamp})")
        with pytest.raises(sqlite3.IntegrityError):  # one lease per folder: one watching node
            conn.execute(f"INSERT INTO folder_leases (folder, node, expires_at, renewed_at) VALUES ('/loras', 'b', {stamp}, {stamp})")
        conn.execute(f"INSERT INTO nodes (name, started_at, heartbeat_at) VALUES ('a', {stamp}, {stamp})")
        assert conn.execute("SELECT running_jobs, draining FROM nodes").fetchall() == [(0, 0)]
    migrate.downgrade(url, "0008")
    assert _tables(db) == TABLES - {"folder_leases", "nodes"}
    for backup in tmp_path.glob("*.bak"):
        backup.unlink()
