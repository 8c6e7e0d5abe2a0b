"""The systemd side: the units verify cleanly, sd_notify speaks the protocol, logs fit journald."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import shutil
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lorad import log as lorad_log
from lorad.daemon import notify

REPO = Path(__file__).resolve().parents[1]
SYSTEM_UNIT = REPO / "systemd" / "lorad.service"
USER_UNIT = REPO / "systemd" / "lorad-user.service"


def lorad_executable() -> Path:
    """The installed `lorad` script next to this interpreter (what ExecStart= must point at)."""
    path = Path(sys.executable).parent / "lorad"
    assert path.is_file() and os.access(path, os.X_OK), f"lorad is not installed at {path}"
    return path


def unit_keys(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit, every value kept (DeviceAllow= and friends repeat)."""
    keys: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            keys[key.strip()].append(value.strip())
    return keys


def verify(unit_text: str, name: str, tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit with ExecStart= pointed at the installed lorad."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the Debian package `systemd`"
    unit = tmp_path / name
    unit.write_text(unit_text)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}
    cmd = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def installed(unit: Path, placeholder: str) -> str:
    text = unit.read_text()
    assert f"ExecStart={placeholder} " in text
    return text.replace(f"ExecStart={placeholder} ", f"ExecStart={lorad_executable()} ")


@pytest.mark.parametrize(
    ("unit", "placeholder", "user"),
    [(SYSTEM_UNIT, "/usr/local/bin/lorad", False), (USER_UNIT, "%h/.local/bin/lorad", True)],
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: Path, placeholder: str, user: bool) -> None:
    result = verify(installed(unit, placeholder), "lorad.service", tmp_path, user)
    assert result.returncode == 0, result.stderr
    # verify exits 0 even for unknown keys, only warning; a clean unit prints nothing at all.
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo'd key is reported."""
    broken = installed(SYSTEM_UNIT, "/usr/local/bin/lorad").replace("ProtectSystem=strict", "ProtectSystm=strict")
    result = verify(broken, "lorad.service", tmp_path, user=False)
    assert "Unknown key" in result.stderr and "ProtectSystm" in result.stderr


def test_system_unit_is_notify_hardened_and_gpu_capable() -> None:
    keys = unit_keys(SYSTEM_UNIT)
    assert keys["Type"] == ["notify"]
    assert keys["ExecStart"][0].split()[1:4] == ["daemon", "--config", "/etc/lorad/config.yaml"]
    assert keys["WatchdogSec"] and keys["StateDirectory"] == ["lorad"] and keys["RuntimeDirectory"] == ["lorad"]
    assert keys["ProtectSystem"] == ["strict"] and keys["ReadWritePaths"]
    assert keys["NoNewPrivileges"] == ["yes"] and keys["DevicePolicy"] == ["closed"]
    allowed = " ".join(keys["DeviceAllow"])
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia"):
        assert device in allowed
    assert "MemoryDenyWriteExecute" not in keys  # breaks CUDA's JIT
    assert "DynamicUser" not in keys  # a fresh uid could not own the watched folders
    assert keys["User"] and keys["User"] != ["root"]
    user = unit_keys(USER_UNIT)
    assert user["Type"] == ["notify"] and user["WantedBy"] == ["default.target"]


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT])
def test_units_are_polite_to_foreground_apps(unit: Path) -> None:
    keys = unit_keys(unit)
    assert 0 < int(keys["Nice"][0]) <= 19
    assert int(keys["CPUWeight"][0]) < 100  # the default weight is 100
    assert keys["IOSchedulingClass"] == ["idle"] and int(keys["IOWeight"][0]) < 100
    assert int(keys["OOMScoreAdjust"][0]) > 0
    # SIGTERM reaches the daemon only, which finishes or kills its reduction process itself.
    assert keys["KillMode"] == ["mixed"]


def test_docs_explain_installing_both_units() -> None:
    text = (REPO / "docs" / "systemd.md").read_text()
    for needle in ("systemctl enable --now lorad", "systemctl --user enable --now lorad", "ReadWritePaths=",
                   "systemd/lorad.service", "systemd/lorad-user.service", "operator_group",
                   "cpu_threads", "gpu_busy", "nvidia-ml-py", "KillMode=mixed"):  # fmt: skip
        assert needle in text


# ---------------------------------------------------------------------------------------------
# sd_notify


def listen_notify(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    return sock


def test_notify_sends_datagrams_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = listen_notify(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    assert notify.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving\n"
    assert notify.status("queue=3\n running=a.safetensors")
    assert sock.recv(4096) == b"STATUS=queue=3 running=a.safetensors"
    assert notify.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notify.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    sock.close()


def test_notify_abstract_socket_and_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lorad-test-{os.getpid()}"
    sock = listen_notify("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert notify.watchdog() and sock.recv(64) == b"WATCHDOG=1"
    sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.ready() is False  # outside systemd: a no-op


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    pid = str(os.getpid())
    assert notify.watchdog_interval({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": pid}) == 90.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({}) is None


# ---------------------------------------------------------------------------------------------
# Logging


def test_log_format_follows_journal_stream_invocation_and_tty(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as f:
        st = os.fstat(f.fileno())
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert lorad_log.choose_format("auto", journal, f) == "journal"
        assert lorad_log.choose_format("auto", {"JOURNAL_STREAM": "1:2"}, f) == "json"  # inherited, not ours
        assert lorad_log.choose_format("auto", {"INVOCATION_ID": "abc"}, f) == "json"
        assert lorad_log.choose_format("console", journal, f) == "console"
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as tty:
        assert lorad_log.choose_format("auto", {}, tty) == "console"
        assert lorad_log.choose_format("json", {}, tty) == "json"
    os.close(leader)
    with pytest.raises(ValueError):
        lorad_log.choose_format("xml", {}, io.StringIO())


def test_json_logs_are_one_object_per_line_for_structlog_and_stdlib() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert lorad_log.configure("json", stream=out) == "json"
        lorad_log.get_logger("lorad.test").info("reduced", path="/w/a.safetensors", saved_bytes=123)
        logging.getLogger("apscheduler.scheduler").warning("job missed")
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["logger"]) for e in lines] == [
        ("reduced", "info", "lorad.test"),
        ("job missed", "warning", "apscheduler.scheduler"),
    ]
    assert lines[0]["path"] == "/w/a.safetensors" and lines[0]["saved_bytes"] == 123
    assert lines[0]["timestamp"].endswith("Z")


def test_journal_lines_carry_a_syslog_priority_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with open(tmp_path / "journal", "w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            assert lorad_log.configure("auto", stream=out) == "journal"
            lorad_log.get_logger("lorad.test").info("ready")
            lorad_log.get_logger("lorad.test").error("job failed", job=3)
        finally:
            root.handlers = saved[0]
            root.setLevel(saved[1])
    lines = (tmp_path / "journal").read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<3>"]
    assert json.loads(lines[1][3:])["job"] == 3


def test_capture_helper_collects_events() -> None:
    with lorad_log.captured() as events:
        lorad_log.get_logger("lorad.test").warning("stale socket", path="/run/x")
    assert events == [{"event": "stale socket", "path": "/run/x", "log_level": "warning"}]


# ---------------------------------------------------------------------------------------------
# The real daemon under a fake service manager


def test_daemon_is_ready_only_once_migrated_and_listening(tmp_path: Path) -> None:
    import signal as sig
    import sqlite3
    import time

    from lorad.library.db import migrate
    from tests._daemon_fixtures import Daemon, lorad_env, write_config

    notify_path = tmp_path / "notify.sock"
    manager = listen_notify(str(notify_path))
    manager.settimeout(60)
    config = write_config(tmp_path)
    env = lorad_env(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    daemon = Daemon(config, tmp_path / "daemon.log", env=env)
    daemon.start(wait_ready=False)
    try:
        messages: list[bytes] = []
        while not any(m.startswith(b"READY=1") for m in messages):
            messages.append(manager.recv(4096))
        # At READY=1: the socket answers and the database is at the newest migration.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(tmp_path / "run" / "lorad.sock"))
            s.sendall(b'{"v":1,"id":1,"method":"hello","params":{}}\n')
            assert json.loads(s.makefile().readline())["result"]["daemon"] == "lorad"
        db = sqlite3.connect(tmp_path / "state" / "lorad.db")
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == migrate.head()
        db.close()
        assert messages[0].startswith(b"STATUS=")  # progress reported before READY
        assert b"STATUS=queue=0" in messages[-1]
        deadline = time.monotonic() + 30
        while b"WATCHDOG=1" not in messages and time.monotonic() < deadline:
            messages.append(manager.recv(4096))
        assert b"WATCHDOG=1" in messages  # pinged while the worker is healthy
        assert daemon.stop(sig.SIGTERM) == 0
        tail = []
        while True:
            try:
                tail.append(manager.recv(4096))
            except TimeoutError:
                break
            if tail[-1].startswith(b"STOPPING=1"):
                break
        assert tail and tail[-1].startswith(b"STOPPING=1")
        assert not (tmp_path / "run" / "lorad.sock").exists()  # a clean stop removes its socket
    finally:
        if daemon.proc and daemon.proc.poll() is None:
            daemon.stop(sig.SIGKILL)
        manager.close()
