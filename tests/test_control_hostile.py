"""Hostile callers against the real daemon (issue 10): connection floods and idle hoarding, hostile
request lines, non-UTF-8 paths, and a control plane that stops answering under systemd's watchdog.

Callers under other uids are forked from this (root) process and demoted: the interpreter lives
where other uids cannot reach it, so they cannot exec a fresh `python -m lorad`. A demoted child
runs the real CLI entry point (`lorad.cli.cli.main`) and exits with its status.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lorad.cli.cli
from lorad.daemon.control.client import Client
from lorad.daemon.control.protocol import ControlError
from lorad.daemon.control.server import MAX_CONNECTIONS, PER_UID_CONNECTIONS
from tests._daemon_fixtures import Daemon, cli, lorad_env, sigstopped, wait_for, write_config

BUSY_LINE = "lorad: the daemon is busy (too many connections); try again"
BUSY_EXIT = 75
OUTSIDERS = (60001, 60002)  # uids in the socket's group (gid 0), not operators


@dataclass
class Rig:
    config: Path
    sock: Path
    loras: Path
    daemon: Daemon


def start_rig(tmp_path: Path, env: dict[str, str] | None = None) -> Rig:
    # The socket lives outside pytest's 0700 tmp so that outsiders can reach it (mode 0660, gid 0).
    sockdir = Path(tempfile.mkdtemp(prefix="lorad-hostile-", dir="/tmp"))
    sockdir.chmod(0o755)
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(f"socket: {tmp_path / 'run' / 'lorad.sock'}", f"socket: {sockdir / 'lorad.sock'}"))
    daemon = Daemon(config, tmp_path / "daemon.log", **({"env": env} if env else {}))
    return Rig(config, sockdir / "lorad.sock", tmp_path / "loras", daemon)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = start_rig(tmp_path)
    rig.daemon.start()
    yield rig
    if rig.daemon.proc is not None and rig.daemon.proc.poll() is None:
        rig.daemon.stop(signal.SIGKILL)
    shutil.rmtree(rig.sock.parent, ignore_errors=True)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs callers under other uids, so it must run as root", pytrace=False)


def connect(path: Path, timeout: float = 30) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))  # blocking: waits for room in a full backlog instead of failing at once
    s.settimeout(timeout)
    return s


def exchange(path: Path, data: bytes, timeout: float = 30) -> list[dict[str, Any]]:
    """Send `data` on one connection, half-close it and return every reply line."""
    with connect(path, timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # refused mid-send (an oversized line); the reply is still there to read
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def hello(path: Path) -> dict[str, Any]:
    [reply] = exchange(path, b'{"v":1,"id":1,"method":"hello"}\n')
    return reply


def hung_up(s: socket.socket) -> bool:
    """Whether the daemon closed this connection (without waiting for it to do so)."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False


def internal_errors_logged(rig: Rig) -> list[dict[str, Any]]:
    return [e for e in rig.daemon.log_events() if e.get("event") == "control method failed" or "Traceback" in str(e)]


# ---------------------------------------------------------------------------------------------
# Callers under other uids


def _in_child(uid: int, gid: int, body: Callable[[], int]) -> int:
    """Fork; the child drops to uid/gid (no supplementary groups), runs `body` and exits with its
    status without ever returning into pytest. Returns the child's pid."""
    lorad.cli.cli.build_parser()  # import every command module while still root
    pid = os.fork()
    if pid:
        return pid
    status = 70
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        status = body()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a real `lorad` process
        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(status)


@dataclass
class Ran:
    status: int
    out: str
    err: str


def run_as(uid: int, body: Callable[[], int], gid: int = 0, timeout: float = 60) -> int:
    """body() in a child running as uid; its exit status."""
    pid = _in_child(uid, gid, body)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"uid {uid}'s child did not finish within {timeout:.0f}s")
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(done[1])


def lorad_as(uid: int, *argv: str, gid: int = 0, timeout: float = 60) -> Ran:
    """`lorad ARGV` as uid (gid 0: the socket's group), stdout and stderr captured as text."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:

        def body() -> int:
            sys.stdout = open(out.fileno(), "w", encoding="utf-8", closefd=False)
            sys.stderr = open(err.fileno(), "w", encoding="utf-8", errors="backslashreplace", closefd=False)
            return lorad.cli.cli.main(list(argv))

        status = run_as(uid, body, gid, timeout)
        out.seek(0)
        err.seek(0)
        return Ran(status, out.read().decode(), err.read().decode())


class Outsider:
    """A process of another uid that opens `hold` connections and keeps them idle until released,
    after `hang_up` more that connect and close at once."""

    def __init__(self, uid: int, path: Path, hold: int, hang_up: int = 0) -> None:
        self.uid = uid
        ready_r, ready_w = os.pipe()
        self._release_r, self._release_w = os.pipe()

        def body() -> int:
            os.close(ready_r)
            os.close(self._release_w)
            held = [connect(path) for _ in range(hold)]
            for _ in range(hang_up):
                connect(path).close()
            os.write(ready_w, b"ok")
            os.read(self._release_r, 1)  # blocks until the test closes its end
            del held
            return 0

        self.pid = _in_child(uid, 0, body)
        os.close(ready_w)
        os.close(self._release_r)
        ok = os.read(ready_r, 2)
        os.close(ready_r)
        if ok != b"ok":
            self.release()
            raise AssertionError(f"uid {uid} could not open its connections")

    def release(self) -> None:
        if self.pid:
            os.close(self._release_w)
            os.waitpid(self.pid, 0)
            self.pid = 0

    def __enter__(self) -> Outsider:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Floods and hoarding


def test_hangups_at_the_connection_cap_leave_the_control_plane_alive(rig: Rig) -> None:
    """The reported kill: 40 idle connections, then 5 that connect and close. Stopping the daemon
    meanwhile puts all 45 in the backlog, so it meets the hang-ups only once it is at its cap."""
    assert rig.daemon.proc is not None
    sigstopped(rig.daemon)
    try:
        held = [connect(rig.sock) for _ in range(40)]
        for _ in range(5):
            connect(rig.sock).close()
    finally:
        rig.daemon.proc.send_signal(signal.SIGCONT)
    assert hello(rig.sock)["result"]["daemon"] == "lorad"
    status = cli(rig.config, "status", "--json", timeout=60)
    assert json.loads(status.stdout)["pid"] == rig.daemon.proc.pid
    assert sum(map(hung_up, held)) >= 8  # the longest idle made room for newcomers
    for s in held:
        s.close()
    assert internal_errors_logged(rig) == []
    assert rig.daemon.stop() == 0


def test_one_user_holds_at_most_its_share_and_is_told_the_daemon_is_busy(rig: Rig) -> None:
    needs_root()
    hoarder, other = OUTSIDERS[:2]
    with Outsider(hoarder, rig.sock, hold=PER_UID_CONNECTIONS + 32, hang_up=5):
        assert json.loads(cli(rig.config, "status", "--json").stdout)["pid"] == rig.daemon.proc.pid  # root
        theirs = lorad_as(other, "status", "--socket", str(rig.sock), "--json")
        assert theirs.status == 0, theirs
        assert json.loads(theirs.out)["pid"] == rig.daemon.proc.pid  # another user is not locked out
        busy = lorad_as(hoarder, "status", "--socket", str(rig.sock))
        assert (busy.status, busy.out, busy.err) == (BUSY_EXIT, "", BUSY_LINE + "\n")
        busy = lorad_as(hoarder, "list", "--socket", str(rig.sock), "--json")
        assert busy.status == BUSY_EXIT and busy.err == BUSY_LINE + "\n"
        assert json.loads(busy.out)["error"]["code"] == "busy"

        def send_after_the_refusal() -> int:
            with Client(rig.sock) as client:
                client.connect()
                select.select([client._sock], [], [], 30)  # the daemon said busy and hung up
                try:
                    client.call("status")
                except ControlError as e:
                    return 0 if e.code == "busy" else 3
            return 4

        assert run_as(hoarder, send_after_the_refusal) == 0  # the reason, not "closed the connection"
    again = wait_for(lambda: (r := lorad_as(hoarder, "status", "--socket", str(rig.sock))).status == 0 and r, 30,
                     0.2, "the hoarder's slots to come free once it hung up")  # fmt: skip
    assert "queue:" in again.out
    assert internal_errors_logged(rig) == []


def test_a_cap_full_of_idle_connections_makes_room_for_newcomers(rig: Rig) -> None:
    needs_root()
    hoarders = [60101 + i for i in range(MAX_CONNECTIONS // PER_UID_CONNECTIONS)]
    newcomer = OUTSIDERS[0]
    with ExitStack() as stack:
        for uid in hoarders:  # users at their share fill every slot
            stack.enter_context(Outsider(uid, rig.sock, hold=PER_UID_CONNECTIONS))
        theirs = lorad_as(newcomer, "status", "--socket", str(rig.sock), "--json")
        assert theirs.status == 0, theirs
        for _ in range(3):  # root, again and again: each time an idle connection gives way
            assert json.loads(cli(rig.config, "status", "--json").stdout)["pid"] == rig.daemon.proc.pid
    made_room = [e for e in rig.daemon.log_events() if e.get("event") == "closed the longest-idle control connection to make room"]
    assert made_room and made_room[0]["for_uid"] == newcomer and made_room[0]["uid"] in hoarders
    assert internal_errors_logged(rig) == []


def test_a_full_backlog_makes_the_cli_say_busy_rather_than_crash(rig: Rig) -> None:
    assert rig.daemon.proc is not None
    sigstopped(rig.daemon)  # a flood faster than the daemon accepts
    flood = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(rig.sock))
            except BlockingIOError:
                s.close()
                break
            flood.append(s)
        busy = cli(rig.config, "status", check=False, timeout=60)
    finally:
        rig.daemon.proc.send_signal(signal.SIGCONT)
    assert (busy.returncode, busy.stdout, busy.stderr) == (BUSY_EXIT, "", BUSY_LINE + "\n")
    for s in flood:
        s.close()
    assert hello(rig.sock)["result"]["daemon"] == "lorad"
    assert internal_errors_logged(rig) == []


def test_junk_huge_lines_and_rapid_connects_are_survived(rig: Rig) -> None:
    [junk] = exchange(rig.sock, b"\x00\xff junk }{\n")
    assert junk["error"]["code"] == "bad_json"
    [huge] = exchange(rig.sock, b'{"v":1,"id":1,"method":"list","params":{"folder":"' + b"a" * (1 << 20) + b'"}}\n')
    assert huge["error"]["code"] == "too_large"
    for _ in range(200):
        connect(rig.sock).close()
    assert hello(rig.sock)["result"]["daemon"] == "lorad"
    assert internal_errors_logged(rig) == []


# ---------------------------------------------------------------------------------------------
# Hostile request lines


def _req(method: str, params: dict[str, Any], rid: int = 7) -> bytes:
    return json.dumps({"v": 1, "id": rid, "method": method, "params": params}).encode() + b"\n"


def test_hostile_request_lines_get_precise_errors_never_internal(rig: Rig) -> None:
    watched = str(rig.loras)
    cases: list[tuple[str, bytes, str, Any]] = [
        ("nested arrays", b'{"v":1,"id":7,"method":"list","params":{"folder":' + b"[" * 5000 + b"]" * 5000 + b"}}\n",
         "bad_request", None),
        ("nested id", b'{"v":1,"id":' + b"[" * 20000 + b"]" * 20000 + b',"method":"hello"}\n', "bad_request", None),
        ("5000-digit id", b'{"v":1,"id":' + b"9" * 5000 + b',"method":"hello"}\n', "bad_request", None),
        ("id over 63 bits", b'{"v":1,"id":9223372036854775808,"method":"hello"}\n', "bad_request", None),
        ("25-digit LoRA id", _req("show", {"target": 10**24}), "bad_params", 7),
        ("25-digit LoRA id as text", _req("show", {"target": "1" * 25}), "not_found", 7),
        ("25-digit variant", _req("switch", {"path": watched + "/a.safetensors", "variant": -(10**24)}), "bad_params", 7),
        ("lone surrogate path", b'{"v":1,"id":7,"method":"show","params":{"target":"/tmp/\\ud800x"}}\n', "bad_params", 7),
        ("lone surrogate folder", b'{"v":1,"id":7,"method":"list","params":{"folder":"' + watched.encode() + b'/\\udfff"}}\n',
         "bad_params", 7),
        ("surrogate sent as raw bytes", b'{"v":1,"id":7,"method":"list","params":{"folder":"/tmp/\xed\xa0\x80"}}\n', "bad_json", None),
        ("non-UTF-8 bytes", b'{"v":1,"id":7,"method":"show","params":{"target":"/tmp/\xff"}}\n', "bad_json", None),
        ("non-UTF-8 file name, show", b'{"v":1,"id":7,"method":"show","params":{"target":"' + watched.encode() + b'/\\udcff.safetensors"}}\n',
         "not_found", 7),
        ("non-UTF-8 file name, revert", b'{"v":1,"id":7,"method":"revert","params":{"path":"' + watched.encode() + b'/\\udcff.safetensors"}}\n',
         "not_found", 7),
        ("non-UTF-8 file name, reduce", b'{"v":1,"id":7,"method":"reduce","params":{"path":"' + watched.encode() + b'/\\udcff.safetensors"}}\n',
         "not_found", 7),
        ("overlong file name", _req("reduce", {"path": watched + "/" + "a" * 300 + ".safetensors"}), "bad_params", 7),
        ("overlong path", _req("show", {"target": watched + "/a" * 3000}), "bad_params", 7),
        ("unicode digit", _req("show", {"target": "\u00b2"}), "outside_watch", 7),
    ]  # fmt: skip
    got = {name: (exchange(rig.sock, line) or [{"no reply": True}])[0] for name, line, _, _ in cases}
    wrong = {name: got[name] for name, _, code, rid in cases
             if got[name].get("error", {}).get("code") != code or got[name].get("id") != rid}  # fmt: skip
    assert wrong == {}
    for name, _, code, _ in cases:
        if code == "bad_params":
            assert any(p in got[name]["error"]["message"] for p in ("'target'", "'folder'", "'path'", "'variant'")), got[name]
    assert hello(rig.sock)["result"]["daemon"] == "lorad"
    assert internal_errors_logged(rig) == []


def test_the_cli_takes_non_utf8_paths_without_a_traceback(rig: Rig) -> None:
    inside = os.fsdecode(os.fsencode(str(rig.loras)) + b"/\xff.safetensors")  # argv bytes, as Python sees them
    shown = cli(rig.config, "show", inside, check=False)
    assert (shown.returncode, shown.stdout) == (2, "")
    assert "Traceback" not in shown.stderr and len(shown.stderr.splitlines()) == 1
    assert shown.stderr.startswith("lorad: error:") and "\\xff.safetensors" in shown.stderr  # the byte, as `ls -b` shows it
    shown = cli(rig.config, "show", inside, "--json", check=False)
    assert shown.returncode == 2 and json.loads(shown.stdout)["error"]["code"] == "not_found"
    outside = cli(rig.config, "list", "/tmp/\udcfe", "--json", check=False)
    assert outside.returncode == 2 and json.loads(outside.stdout)["error"]["code"] == "outside_watch"
    assert "Traceback" not in outside.stderr
    assert internal_errors_logged(rig) == []


# ---------------------------------------------------------------------------------------------
# The watchdog


def test_the_watchdog_stops_when_the_control_socket_stops_answering(tmp_path: Path) -> None:
    """A daemon whose socket no longer answers must stop feeding systemd's watchdog, so systemd
    restarts it. A fake service manager receives the pings; removing the socket file cuts callers off."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.settimeout(30)
    rig = start_rig(tmp_path, lorad_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="1000000"))
    rig.daemon.start()
    try:
        pings = 0
        while pings < 3:  # healthy: a ping every half second
            pings += manager.recv(4096) == b"WATCHDOG=1"
        rig.sock.unlink()
        wait_for(lambda: any(e.get("event") == "control socket does not answer" for e in rig.daemon.log_events()), 30,
                 0.1, "the daemon to notice that its socket does not answer")  # fmt: skip
        manager.setblocking(False)
        while True:  # what was sent before the daemon noticed
            try:
                manager.recv(4096)
            except BlockingIOError:
                break
        manager.settimeout(0.2)
        quiet_until = time.monotonic() + 4
        late = []
        while time.monotonic() < quiet_until:
            try:
                late.append(manager.recv(4096))
            except TimeoutError:
                pass
        assert b"WATCHDOG=1" not in late
        assert rig.daemon.proc is not None and rig.daemon.proc.poll() is None  # alive, left to systemd
        assert rig.daemon.stop() == 0
    finally:
        if rig.daemon.proc is not None and rig.daemon.proc.poll() is None:
            rig.daemon.stop(signal.SIGKILL)
        manager.close()
        shutil.rmtree(rig.sock.parent, ignore_errors=True)
