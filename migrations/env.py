"""Alembic environment for lorad: run from `lorad.library.db.migrate` (configured in code, no alembic.ini).

SQLite: batch mode ("move and copy") rebuilds tables, so foreign keys are switched off for the run,
outside any transaction (a PRAGMA inside one is ignored; sqlalchemy/alembic#345), and checked with
`PRAGMA foreign_key_check` before the transaction commits.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from lorad.library.db.models import Base
from lorad.library.db.session import make_engine

target_metadata = Base.metadata


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        literal_binds=connection is None,
    )


def run_offline() -> None:
    _configure(url=context.config.get_main_option("sqlalchemy.url"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = context.config.attributes.get("database_url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                # Straight on the driver connection: SQLAlchemy would open a transaction first.
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    _check_foreign_keys(connection)
    finally:
        engine.dispose()


def _check_foreign_keys(connection: Connection) -> None:
    broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
    if broken:
        raise RuntimeError(f"migration left broken foreign keys: {broken[:5]}")


if context.is_offline_mode():
    run_offline()
else:
    run_online()
