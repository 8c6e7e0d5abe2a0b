"""`lorad db upgrade|current`: bring the database schema to this lorad's head, or show where it is.

The database is, in order: --database URL, the config's `database`, or lorad.db in the state
directory (--state-dir, the config's, or the default one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorad.errors import StoreError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: upgrade, current", description=__doc__)
    db_sub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    for name, func, text in (
        ("upgrade", upgrade_command, "migrate the schema to head (backing up SQLite first)"),
        ("current", current_command, "show the schema revision and whether an upgrade is pending"),
    ):
        q = db_sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", type=Path, help="YAML config file (for its state_dir/database)")
        q.add_argument("--state-dir", type=Path, help="state directory holding lorad.db")
        q.add_argument("--database", metavar="URL", help="SQLAlchemy URL (overrides the rest)")
        q.set_defaults(func=func)


def database_url(args: argparse.Namespace) -> str:
    if args.database:
        return str(args.database)
    from lorad.daemon import config as cfg

    if args.config:
        loaded = cfg.load_config(args.config)
        if args.state_dir is None:
            return loaded.database
        loaded = cfg.with_overrides(loaded, state_dir=args.state_dir)
        return loaded.database
    state = Path(args.state_dir) if args.state_dir else cfg.default_state_dir()
    from lorad.library.db.session import default_url

    return default_url(state)


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def upgrade_command(args: argparse.Namespace) -> int:
    from lorad.library.db import migrate
    from lorad.library.db.session import sqlite_path
    from lorad.state_dir import Modes, secure_dir, secure_sqlite

    url = database_url(args)
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.exists():  # a folder we create is private; a user's own one is left alone
            secure_dir(path.parent, Modes())
        secure_sqlite(path, Modes())  # created 0600 before SQLite opens it (its -wal/-shm follow)
    before = _guarded(url, migrate.current)
    if before == migrate.head():
        print(f"{_shown(url)}: already at head {before}")
        return 0
    backup = _guarded(url, migrate.upgrade)
    print(f"{_shown(url)}: upgraded {before or 'empty'} -> {migrate.head()}"
          + (f" (backup: {backup})" if backup else ""))  # fmt: skip
    return 0


def current_command(args: argparse.Namespace) -> int:
    from lorad.library.db import migrate
    from lorad.library.db.session import sqlite_path

    url = database_url(args)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreError(f"no database at {path}; `lorad db upgrade` creates it")
    at, head = _guarded(url, migrate.current), migrate.head()
    if at == head:
        print(f"{at} (head)")
    else:
        print(f"{at or 'empty'} (head is {head}: run `lorad db upgrade`)")
    return 0


def _guarded(url: str, call):  # type: ignore[no-untyped-def]
    """Database errors as one line the user can act on."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return call(url)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise StoreError(f"database {_shown(url)}: {reason}") from e
