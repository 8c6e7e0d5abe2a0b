"""The state directory is private: real directories, a real SQLite file with its WAL and SHM, real
blobs; the files lorad writes at watched paths keep their own modes."""

from __future__ import annotations

import grp
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from lorad.library.db import migrate
from lorad.library.library import Library
from tests._store_fixtures import make_lora, reduce_with_engine, sha256_of


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def a_group() -> int:
    """An existing group that is not root's, to stand for the operator group."""
    return next(g.gr_gid for g in grp.getgrall() if g.gr_gid != 0)


def exercise(tmp_path: Path, root: Path, **kwargs) -> tuple[Library, Path]:  # type: ignore[no-untyped-def]
    """Ingest, reduce and activate one LoRA whose file the user keeps at 0664."""
    path = make_lora(root / "style.safetensors")
    os.chmod(path, 0o664)
    lib = Library(tmp_path / "state", [root], link_mode="copy", **kwargs)
    lib.ingest(path)
    report = reduce_with_engine(lib.store.path_of(lib.lora(path).original.blob_sha256), tmp_path / "r.safetensors", 4)
    lib.activate(path, lib.add_variant(path, report).id)
    return lib, path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def test_state_is_owner_only_and_watched_files_keep_their_mode(tmp_path: Path, root: Path) -> None:
    old = os.umask(0o022)  # the usual umask outside systemd, which made all of this world-readable
    try:
        lib, path = exercise(tmp_path, root)
    finally:
        os.umask(old)
    state = tmp_path / "state"
    try:
        db = state / "lorad.db"
        assert mode(state) == 0o700
        assert {s: mode(Path(f"{db}{s}")) for s in ("", "-wal", "-shm")} == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
        blobs = [lib.store.path_of(sha) for sha in lib.store.blobs()]
        assert len(blobs) == 2 and {mode(b) for b in blobs} == {0o400}
        assert mode(path) == 0o664 and sha256_of(path) == lib.lora(path).active.blob_sha256
    finally:
        lib.close()


def test_an_operator_group_may_read_the_state(tmp_path: Path, root: Path) -> None:
    gid = a_group()
    lib, path = exercise(tmp_path, root, operator_gid=gid)
    state = tmp_path / "state"
    try:
        private = [state, state / "lorad.db", state / "lorad.db-wal", state / "lorad.db-shm"]
        blobs = [lib.store.path_of(sha) for sha in lib.store.blobs()]
        assert [mode(p) for p in private] == [0o750, 0o640, 0o640, 0o640]
        assert {mode(b) for b in blobs} == {0o440}
        assert {os.stat(p).st_gid for p in private + blobs} == {gid}
        assert mode(path) == 0o664 and os.stat(path).st_gid == 0  # the watched file is the user's
    finally:
        lib.close()


def test_state_an_older_lorad_left_open_is_narrowed(tmp_path: Path, root: Path) -> None:
    state = tmp_path / "state"
    with Library(state, [root]) as lib:
        lib.ingest(make_lora(root / "a.safetensors"))
    os.chmod(state, 0o755)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{state / 'lorad.db'}{suffix}").exists():
            os.chmod(f"{state / 'lorad.db'}{suffix}", 0o644)
    with Library(state, [root]):
        assert mode(state) == 0o700 and mode(state / "lorad.db") == 0o600
        assert all(mode(p) == 0o600 for p in state.glob("lorad.db-*"))


def test_hardlinked_blobs_stay_readable_by_the_watched_folders_readers(tmp_path: Path, root: Path) -> None:
    # A hardlink shares the blob's inode with the watched file: narrowing one narrows the other.
    with Library(tmp_path / "state", [root], link_mode="hardlink") as lib:
        path = make_lora(root / "a.safetensors")
        sha = lib.ingest(path).original.blob_sha256
        assert mode(lib.store.path_of(sha)) == 0o444


def test_the_migration_backup_is_as_private_as_the_database(tmp_path: Path) -> None:
    db = tmp_path / "lorad.db"
    url = f"sqlite:///{db}"
    migrate.upgrade(url, "0002")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO events (at, kind, actor, detail) VALUES ('2026-01-01', 'verified', 't', '{}')")
    os.chmod(db, 0o600)
    old = os.umask(0o022)
    try:
        backup = migrate.upgrade(url)
    finally:
        os.umask(old)
    assert backup is not None and mode(backup) == 0o600
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
