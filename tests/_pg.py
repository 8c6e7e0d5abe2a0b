"""A real, throwaway PostgreSQL server for the tests: one per session, a fresh database per test.

The server is initdb'd into a private temp dir and listens only on a Unix socket there (no TCP
port, so nothing clashes with other servers or test runs). initdb and postgres refuse to run as
root, so as root they run as the `postgres` system user, which then owns the dir.

Import the fixtures into a test module: `from tests._pg import pg_server, pg_url  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "lorad"
# Only names the socket file (.s.PGSQL.<port>) inside the private dir: no TCP port is opened.
PORT = 5432
COMMAND_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10
# A lock wait or statement that hangs becomes an error instead of a hung test run.
SERVER_SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",  # throwaway data: durability only costs time here
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "lock_timeout": "10s",
    "statement_timeout": "30s",
    "max_connections": "50",
}


@dataclass(frozen=True)
class PgServer:
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return (
            f"postgresql+psycopg://{SUPERUSER}@/{database}"
            f"?host={self.socket_dir}&port={self.port}&connect_timeout={CONNECT_TIMEOUT_S}"
        )

    def admin_connect(self):  # type: ignore[no-untyped-def]
        """An autocommit connection to the maintenance database (CREATE/DROP DATABASE)."""
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname="postgres",
            autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
        )  # fmt: skip


def find_bin_dir() -> Path:
    """The newest installed server's bin dir; fails (never skips) when there is none, because
    the PostgreSQL support is only proven where these tests run."""
    candidates = [Path(d) for d in glob.glob(BIN_GLOB) if (Path(d) / "initdb").is_file()]
    if not candidates:
        pytest.fail(
            f"no PostgreSQL server found (looked for {BIN_GLOB}/initdb); install the Debian "
            "`postgresql` package (.ci/run does) to run tests/test_postgres.py",
            pytrace=False,
        )
    return max(candidates, key=lambda d: _version_key(d.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _server_user() -> dict[str, object]:
    """subprocess arguments that drop root to the `postgres` user (as anyone else: no change)."""
    if os.geteuid() != 0:
        return {}
    try:
        pg = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root but there is no `postgres` system user to run the server as",
                    pytrace=False)  # fmt: skip
    return {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": []}


def _run(args: list[str], cwd: Path, as_user: dict[str, object]) -> None:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
        stdin=subprocess.DEVNULL, **as_user,  # type: ignore[arg-type]
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _private_dir(as_user: dict[str, object]) -> Path:
    # Under /tmp rather than $TMPDIR: a Unix socket path must stay under ~107 bytes.
    base = Path(tempfile.mkdtemp(prefix="lorad-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    if as_user:
        os.chown(base, as_user["user"], as_user["group"])  # type: ignore[arg-type]
    return base


def _start(bin_dir: Path, base: Path, as_user: dict[str, object]) -> None:
    data = base / "data"
    _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", SUPERUSER, "--no-sync",
          "-E", "UTF8", "--locale=C", "--no-instructions"], base, as_user)  # fmt: skip
    _pg_ctl_start(bin_dir, base, as_user)


def _pg_ctl_start(bin_dir: Path, base: Path, as_user: dict[str, object]) -> None:
    data, log = base / "data", base / "server.log"
    options = " ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items())
    try:
        _run([str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(COMMAND_TIMEOUT_S), "-D", str(data),
              "-l", str(log), "-o", f"{options} -k {base} -p {PORT}"], base, as_user)  # fmt: skip
    except RuntimeError as e:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        raise RuntimeError(f"{e}\nserver log:\n{tail}") from None


def _stop(bin_dir: Path, base: Path, as_user: dict[str, object]) -> None:
    data = base / "data"
    try:
        _run([str(bin_dir / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", str(COMMAND_TIMEOUT_S),
              "-D", str(data)], base, as_user)  # fmt: skip
    except (RuntimeError, subprocess.TimeoutExpired):
        _kill_postmaster(data)  # never leave a server running behind the tests


def _kill_postmaster(data: Path) -> None:
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def _cluster() -> Iterator[tuple[Path, Path, dict[str, object]]]:
    """A new cluster in a private folder, started: (bin_dir, its folder, the user it runs as);
    stopped and removed afterwards."""
    bin_dir = find_bin_dir()
    as_user = _server_user()
    base = _private_dir(as_user)
    try:
        _start(bin_dir, base, as_user)
        try:
            yield bin_dir, base, as_user
        finally:
            _stop(bin_dir, base, as_user)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with _cluster() as (_bin_dir, base, _as_user):
        yield PgServer(base, PORT)


@dataclass(frozen=True)
class OwnPgServer(PgServer):
    """A server of one's own, which a test may stop and start again (the same cluster, the same
    socket): a database lost mid-run and back."""

    bin_dir: Path
    as_user: dict[str, object]

    def stop(self) -> None:
        """Fast shutdown (open connections are terminated), waited for."""
        _run([str(self.bin_dir / "pg_ctl"), "stop", "-m", "fast", "-w", "-t", str(COMMAND_TIMEOUT_S),
              "-D", str(self.socket_dir / "data")], self.socket_dir, self.as_user)  # fmt: skip

    def start(self) -> None:
        """Start again, waited for until it accepts connections."""
        _pg_ctl_start(self.bin_dir, self.socket_dir, self.as_user)

    def create_database(self, name: str) -> str:
        from psycopg import sql

        with self.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)


@pytest.fixture
def pg_own_server() -> Iterator[OwnPgServer]:
    """A private server for one test, which it may stop and start (not the session's shared one)."""
    with _cluster() as (bin_dir, base, as_user):
        yield OwnPgServer(base, PORT, bin_dir, as_user)


_database_numbers = itertools.count(1)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A SQLAlchemy URL of a new, empty database on the session's server (dropped afterwards)."""
    from psycopg import sql

    name = f"lorad_test_{next(_database_numbers)}"
    with pg_server.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with pg_server.admin_connect() as conn:
        # FORCE: a connection a failed test left open must not keep the database alive.
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
