"""Engine and sessions: SQLite pragmas on connect, BEGIN IMMEDIATE for writes, any URL for the rest.

SQLite: on each connection set busy_timeout first (so the pragmas after it wait instead of failing),
then WAL, foreign keys and synchronous=NORMAL. pysqlite's own transaction handling is switched off
and lorad emits BEGIN itself, so a write transaction takes the write lock up front (BEGIN
IMMEDIATE): a deferred read that later upgrades to a write gets SQLITE_BUSY without waiting.
Other databases (PostgreSQL) get ordinary transactions.

A database that stays locked past busy_timeout (another process holds the write lock) or that has
no room left is no fault of the work at hand: both come out as `DatabaseUnavailable`, a
TransientError, so callers retry later instead of giving up on the file or the job.

A server that cannot be reached mid-run (PostgreSQL stopped or restarting, the network gone: a
failed connect, a connection dropped, SQLSTATE class 08 or 57P) is `DatabaseLost`, a
DatabaseUnavailable. `Database.health` remembers it: the first such failure logs "database
unreachable, retrying" once with the URL and the driver's message (the password hidden in both, as
in the start-up refusal), the next transaction that succeeds logs "database reachable again" once
and tells the listeners (the daemon wakes its workers and retries the files it could not take in);
`lorad status` shows it. Pooled connections are pinged before use (PostgreSQL), so the connections
a restart killed are replaced instead of failing once each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lorad.errors import StoreError, TransientError
from lorad.log import get_logger

log = get_logger("lorad.db")

BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "lorad_begin"
DB_FILENAME = "lorad.db"


# What SQLite and PostgreSQL say when the same statement may succeed later (lock held, disk full).
_TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "database or disk is full",
                       "could not obtain lock", "lock timeout", "no space left on device")  # fmt: skip


class DatabaseUnavailable(StoreError, TransientError):
    """The database is locked by someone else, or full: the same request may succeed later."""


class DatabaseLost(DatabaseUnavailable):
    """The database server cannot be reached now (down, restarting, the connection dropped): the
    same request may succeed once it is back."""


def _raise_transient(error: OperationalError) -> None:
    text = str(error.orig or error)
    if any(m in text.lower() for m in _TRANSIENT_MESSAGES):
        raise DatabaseUnavailable(f"the database is unavailable for now ({text}); try again later") from error


# SQLSTATE classes of a server that is gone or going: 08 connection exception; 57P01-57P03 admin or
# crash shutdown, cannot connect now (starting up).
_LOST_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def is_lost(error: BaseException) -> bool:
    """Whether a driver error means the server cannot be reached (not that a statement failed). A
    libpq failure to connect or a dropped connection has no SQLSTATE."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    module = type(orig).__module__ or ""
    if not module.startswith(("psycopg", "psycopg2")):
        return False
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state is None:
        return isinstance(error, OperationalError)
    return str(state).startswith(_LOST_SQLSTATES)


def _one_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def _cause(url: str, error: BaseException) -> str:
    """The driver's message as one line, the URL's password masked."""
    return _masked(url, _one_line(error))


def _masked(url: str, text: str) -> str:
    """`text` with the URL's password as ***: a driver's message may quote the connection details
    it was given (libpq quotes a URI it cannot parse), and it goes to the log and to `lorad status`."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - no password to find in a URL that does not parse
        password = None
    return text.replace(str(password), "***") if password else text


class Health:
    """Whether the database answered the last time it was asked: one log line when it stops, one
    when it answers again, and listeners told of the return."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reachable = True
        self.since: datetime | None = None  # when it stopped answering (wall clock, UTC)
        self.error: str | None = None
        self.outages = 0
        self._lost_at = self._back_at = 0.0  # monotonic
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_back(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def lost(self, error: BaseException, began: float = float("inf")) -> None:
        """A transaction begun at `began` (monotonic) found the server unreachable. One that began
        before the server last came back belongs to the outage already ended: it opens no new one."""
        with self._lock:
            if self.reachable and began < self._back_at:
                return
            self.error = _cause(self.url, error)
            if not self.reachable:
                return
            self.reachable, self.since, self._lost_at = False, datetime.now(timezone.utc), time.monotonic()
            self.outages += 1
        log.warning("database unreachable, retrying", database=shown_url(self.url), error=self.error)

    def fine(self, began: float = float("inf")) -> None:
        """A transaction begun at `began` succeeded. One that began before the outage was noticed
        (it committed just before the server went) says nothing of the server now."""
        if self.reachable:  # the common case: one attribute read, no lock
            return
        with self._lock:
            if self.reachable or began < self._lost_at:
                return
            self.reachable, since, self.error = True, self.since, None
            self._back_at = time.monotonic()
            seconds = self._back_at - self._lost_at
        log.info("database reachable again", database=shown_url(self.url), unreachable_s=round(seconds, 1),
                 since=since.isoformat() if since else None)  # fmt: skip
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener must not break the transaction that succeeded
                log.exception("a database-back listener failed")

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"reachable": self.reachable, "since": self.since.isoformat() if self.since else None,
                    "error": self.error, "outages": self.outages, "url": shown_url(self.url)}  # fmt: skip


class DatabaseUnreachable(StoreError):
    """The database cannot be used at all: down, a wrong host, port or password, no driver."""


# libpq waits for a host that drops packets as long as TCP does (minutes); a node starting against
# an unreachable PostgreSQL should say so sooner. A URL's own connect_timeout wins.
PG_CONNECT_TIMEOUT_S = 15


def shown_url(url: str) -> str:
    """The URL as lorad prints it: the password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL may still hold a password: never echo it
        return "(the configured database URL, which cannot be parsed)"


def unreachable(url: str, error: BaseException) -> DatabaseUnreachable:
    """A failure to open or migrate the database as one line: the URL without its password, and
    the cause (the driver's message, its lines joined)."""
    if isinstance(error, ImportError):
        cause = _masked(url, f"a module it needs is not installed ({error}); for PostgreSQL: "
                             "pip install 'lorad[postgres]'")  # fmt: skip
    else:
        cause = _cause(url, error)
    return DatabaseUnreachable(f"cannot use the database {shown_url(url)}: {cause}")


def default_url(state_dir: Path) -> str:
    return f"sqlite:///{Path(state_dir).resolve() / DB_FILENAME}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None (not SQLite, or in memory)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def make_engine(url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Engine:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    options: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("psycopg", "psycopg2") \
            and "connect_timeout" not in u.query:
        options["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    if u.get_backend_name() != "sqlite":
        # A connection a server restart killed is noticed at checkout and replaced, instead of
        # failing the first transaction that draws it.
        options["pool_pre_ping"] = True
    engine = create_engine(u, **options)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, busy_timeout_ms)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # lorad emits BEGIN itself (see "begin" below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


class Database:
    """One database: `write()` for a write transaction, `read()` for a consistent read."""

    def __init__(self, url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms)
        writer = self.engine
        if self.engine.dialect.name == "sqlite":
            writer = self.engine.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        self._writer = sessionmaker(writer, expire_on_commit=False)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self.health = Health(url)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE on SQLite): commits on exit, rolls back on error."""
        with self.guard():
            with self._writer() as session, session.begin():
                yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction. Closing it releases the connection (rolling back anything written)
        and keeps the loaded objects readable, detached."""
        with self.guard():
            with self._reader() as session:
                yield session

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Database errors translated for the callers (DatabaseLost, DatabaseUnavailable) and the
        server's reachability kept in `health` (for code that uses the engine itself)."""
        began = time.monotonic()
        try:
            yield
        except DBAPIError as e:
            if is_lost(e):
                self.health.lost(e, began)
                raise DatabaseLost(f"the database {shown_url(self.url)} cannot be reached "
                                   f"({_cause(self.url, e)}); retrying") from e  # fmt: skip
            if isinstance(e, OperationalError):
                _raise_transient(e)
            raise
        self.health.fine(began)

    def close(self) -> None:
        self.engine.dispose()
