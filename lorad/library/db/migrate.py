"""Alembic, configured in code: find the scripts, report the revision, upgrade (with a backup first).

The migration scripts live in the top-level `migrations/` beside the `lorad/` package (a source
checkout or `pip install -e .`). `LORAD_MIGRATIONS` points elsewhere when they are installed apart.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import lorad
from lorad.errors import StoreError
from lorad.library.db.session import make_engine, sqlite_path


def script_location() -> Path:
    """The Alembic script directory: $LORAD_MIGRATIONS, else `migrations/` next to `lorad/` (a
    checkout or editable install), else the copy a wheel carries as `lorad._migrations`."""
    override = os.environ.get("LORAD_MIGRATIONS")
    package = Path(lorad.__file__).resolve().parent
    here = Path(override) if override else package.parent / "migrations"
    if not override and not (here / "env.py").is_file():
        here = package / "_migrations"
    if not (here / "env.py").is_file():
        raise StoreError(f"lorad's database migrations are missing (looked in {here})")
    return here


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolation would read a '%' in a password as a directive.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["database_url"] = url
    return cfg


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    return heads[0]


def current(url: str) -> str | None:
    """The revision the database is at, or None for an empty (never migrated) database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> Path | None:
    """Bring the database to `revision`. A SQLite file with data is backed up first when a
    migration is pending; returns the backup's path (None when nothing was pending or new)."""
    at = current(url)
    target = head() if revision == "head" else revision
    if at == target:
        return None
    backup = _backup_sqlite(url, at, target) if at is not None else None
    command.upgrade(alembic_config(url), revision)
    return backup


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def _backup_sqlite(url: str, at: str, target: str) -> Path | None:
    path = sqlite_path(url)
    if path is None or not path.exists():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.{at}-to-{target}.{stamp}.bak")
    # The copy holds what the database holds: it gets the database's mode (and group) from its
    # first byte, never the umask's wider default.
    st = os.stat(path)
    fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o660)
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, st.st_gid)
    finally:
        os.close(fd)
    # The backup API copies a consistent snapshot even with WAL frames not yet checkpointed.
    src = sqlite3.connect(path)
    try:
        dst = sqlite3.connect(backup)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    return backup
