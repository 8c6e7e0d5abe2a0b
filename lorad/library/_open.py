"""Opening a Library's database: brought to the newest schema, connected, and (as the daemon asks)
the store's identity checked against it before anything is written into the store."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from lorad.library import store_identity
from lorad.library.db.session import Database, DatabaseLost, unreachable


def open_database(
    url: str, busy_timeout_ms: int, migrate_on_open: bool, store_root: Path, check_store_identity: bool, node: str | None
) -> tuple[Database, str | None]:
    """The database, and the store's id where `check_store_identity` (else None). One that cannot
    be opened or migrated is one DatabaseUnreachable (the URL without its password, and the cause)."""
    db: Database | None = None
    store_id: str | None = None
    try:
        if migrate_on_open:
            from lorad.library.db import migrate  # Alembic is only needed here: keep it out of a bare import

            migrate.upgrade(url)
        db = Database(url, busy_timeout_ms)
        if check_store_identity:
            store_id = store_identity.claim(db, store_root, node).store_id
    except (SQLAlchemyError, ImportError, DatabaseLost) as e:
        if db is not None:
            db.close()
        raise unreachable(url, e.__cause__ if isinstance(e, DatabaseLost) and e.__cause__ else e) from e
    except BaseException:
        if db is not None:
            db.close()
        raise
    return db, store_id
