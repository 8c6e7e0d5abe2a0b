"""The watcher: settle rules on real files, a real watchdog observer, reconcile scans."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from watchdog.events import EventsLostEvent

from lorad.daemon.config import WatchDir
from lorad.daemon.watch import (
    Settler,
    Signature,
    Watcher,
    _Handler,
    fs_type,
    partial_siblings,
    scan_folder,
    should_poll,
    signature,
)
from tests._daemon_fixtures import (
    Daemon,
    cli_json,
    lora_bytes,
    make_lora,
    show_if_known,
    sigstopped,
    wait_for,
    write_slowly,
)

SETTLE = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collector:
    """Settled files as the watcher hands them on, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Path, Signature]] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path, watch: WatchDir, sig: Signature) -> None:
        with self._lock:
            self.seen.append((path, sig))

    def paths(self) -> list[Path]:
        with self._lock:
            return [p for p, _ in self.seen]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "loras"
    path.mkdir()
    return path


def start_watcher(folder: Path, poll: bool | None = None, ignore=lambda _p, _s: False, recursive: bool = True):
    collector = Collector()
    watch = WatchDir(path=folder, recursive=recursive, poll=poll)
    watcher = Watcher([watch], SETTLE, 0.1, collector, ignore=ignore)
    watcher.start()
    wait_for(lambda: watcher.reconciles >= 1, 10, what="the start reconcile")
    return watcher, collector


# ---------------------------------------------------------------------------------------------
# Settler rules, with a controlled clock and real files


def test_settler_needs_a_confirming_event_and_a_quiet_period(folder: Path) -> None:
    clock = FakeClock()
    settler = Settler(2.0, clock)
    path = make_lora(folder / "a.safetensors")
    settler.hint(path, confirmed=False)  # "created": writing has only started
    clock.now += 10
    assert settler.due() == []
    settler.hint(path, confirmed=True)  # close-write
    clock.now += 1.9
    assert settler.due() == []
    clock.now += 0.2
    assert settler.due() == [(path, signature(path))]
    assert settler.due() == []  # handed on once


def test_settler_restarts_quiet_period_when_the_file_changes(folder: Path) -> None:
    clock = FakeClock()
    settler = Settler(2.0, clock)
    path = folder / "a.safetensors"
    data = lora_bytes()
    path.write_bytes(data[:100])
    settler.hint(path, confirmed=True)
    clock.now += 1.5
    assert settler.due() == []
    path.write_bytes(data)  # it grew: the signature changed
    clock.now += 1.0
    assert settler.due() == []  # noticed the change; quiet again only from now
    clock.now += 2.1
    assert settler.due() == [(path, signature(path))]


@pytest.mark.parametrize("suffix", [".part", ".crdownload", ".aria2", ".incomplete", ".tmp"])
def test_settler_waits_while_a_partial_sibling_exists(folder: Path, suffix: str) -> None:
    clock = FakeClock()
    settler = Settler(1.0, clock)
    path = make_lora(folder / "a.safetensors")
    marker = folder / f"a.safetensors{suffix}"
    marker.write_bytes(b"")
    assert partial_siblings(path) == [marker]
    settler.hint(path, confirmed=True)
    clock.now += 5
    assert settler.due() == []
    marker.unlink()
    clock.now += 1.1
    assert settler.due() == [(path, signature(path))]


def test_settler_rejects_an_incomplete_file_until_it_changes(folder: Path) -> None:
    clock = FakeClock()
    settler = Settler(1.0, clock)
    path = folder / "a.safetensors"
    data = lora_bytes()
    path.write_bytes(data[:-10])  # preallocated-and-stalled or truncated: header and size disagree
    settler.hint(path, confirmed=True)
    clock.now += 2
    assert settler.due() == []
    settler.hint(path, confirmed=True)  # a rescan: same bytes, still not taken
    clock.now += 2
    assert settler.due() == [] and settler.pending() == []
    path.write_bytes(data)
    settler.hint(path, confirmed=True)
    clock.now += 2
    assert settler.due() == [(path, signature(path))]


def test_settler_ignores_non_lora_and_hidden_names(folder: Path) -> None:
    settler = Settler(0.0, FakeClock())
    for name in ("notes.txt", ".a.safetensors.lorad-tmp", ".hidden.safetensors", "a.safetensors.part"):
        (folder / name).write_bytes(lora_bytes())
        settler.hint(folder / name, confirmed=True)
    assert settler.pending() == []


def test_scan_folder_respects_recursion(folder: Path) -> None:
    top = make_lora(folder / "top.safetensors")
    deep = make_lora(folder / "sub" / "deep.safetensors")
    (folder / "readme.txt").write_text("x")
    assert list(scan_folder(WatchDir(path=folder))) == [top, deep]
    assert list(scan_folder(WatchDir(path=folder, recursive=False))) == [top]


def test_network_filesystems_poll(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/nas nfs4 rw 0 0\n"
        "//host/share /mnt/my\\040share cifs rw 0 0\n"
        "rclone: /mnt/cloud fuse.rclone rw 0 0\n"
    )
    assert fs_type(Path("/mnt/nas/loras"), str(mounts)) == "nfs4"
    assert fs_type(Path("/mnt/my share/x"), str(mounts)) == "cifs"
    assert fs_type(Path("/home/u/loras"), str(mounts)) == "ext4"
    auto = WatchDir(path=Path("/x"))
    assert should_poll(auto, "nfs4") and should_poll(auto, "fuse.rclone") and should_poll(auto, "cifs")
    assert not should_poll(auto, "ext4")
    assert should_poll(WatchDir(path=Path("/x"), poll=True), "ext4")
    assert not should_poll(WatchDir(path=Path("/x"), poll=False), "nfs")


# ---------------------------------------------------------------------------------------------
# The real observer


def test_a_dropped_file_is_handed_on_once(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        path = make_lora(folder / "a.safetensors")
        wait_for(lambda: got.paths() == [path], 10, what="a.safetensors to settle")
        # Files are handed on in the order they settle: a second hand-on of a.safetensors would
        # come before that of a file written after it was handed on.
        later = make_lora(folder / "later.safetensors", seed=1)
        wait_for(lambda: later in got.paths(), 10, what="later.safetensors to settle")
        assert got.paths() == [path, later]
        assert got.seen[0][1] == signature(path)
    finally:
        watcher.stop()


def test_a_slow_chunked_copy_is_taken_only_when_complete(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        data = lora_bytes(seed=3, dim=64)
        path = folder / "slow.safetensors"
        writer = threading.Thread(target=write_slowly, args=(data, path, 10, SETTLE * 0.6))
        writer.start()
        while writer.is_alive():
            assert got.paths() == [], "taken while still being written"
            time.sleep(0.02)
        writer.join()
        wait_for(lambda: got.paths() == [path], 10, what="the slow copy to settle")
        assert got.seen[0][1].size == len(data)
    finally:
        watcher.stop()


def test_a_part_file_renamed_into_place_is_taken_under_its_final_name(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        part = folder / "dl.safetensors.part"
        write_slowly(lora_bytes(seed=4), part, 4, 0.05)
        later = make_lora(folder / "later.safetensors", seed=1)  # settles after the .part would have
        wait_for(lambda: later in got.paths(), 10, what="the file written after the .part")
        assert got.paths() == [later]
        final = folder / "dl.safetensors"
        os.rename(part, final)
        wait_for(lambda: got.paths() == [later, final], 10, what="the renamed download")
    finally:
        watcher.stop()


def test_an_aria2_sibling_holds_the_file_back(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        control = folder / "big.safetensors.aria2"
        control.write_bytes(b"aria2 control")
        path = make_lora(folder / "big.safetensors")
        later = make_lora(folder / "later.safetensors", seed=1)  # settles after big would have
        wait_for(lambda: later in got.paths(), 10, what="the file written after big.safetensors")
        assert got.paths() == [later]
        control.unlink()
        wait_for(lambda: got.paths() == [later, path], 10, what="the file after its .aria2 went away")
    finally:
        watcher.stop()


def test_a_move_in_from_outside_and_a_new_subfolder_are_seen(folder: Path, tmp_path: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        outside = make_lora(tmp_path / "outside" / "m.safetensors", seed=5)
        moved = folder / "m.safetensors"
        shutil.move(outside, moved)
        staged = make_lora(tmp_path / "staged" / "pack" / "n.safetensors", seed=6)
        shutil.move(staged.parent, folder / "pack")  # a whole folder arrives at once
        want = {moved, folder / "pack" / "n.safetensors"}
        wait_for(lambda: set(got.paths()) == want, 10, what=f"{want}")
    finally:
        watcher.stop()


def test_files_present_before_start_are_found_by_the_start_reconcile(folder: Path) -> None:
    before = make_lora(folder / "old" / "before.safetensors")
    watcher, got = start_watcher(folder)
    try:
        wait_for(lambda: got.paths() == [before], 10, what="the pre-existing file")
    finally:
        watcher.stop()


def test_own_writes_are_ignored(folder: Path) -> None:
    mine: set[Signature] = set()
    watcher, got = start_watcher(folder, ignore=lambda _p, sig: sig in mine)
    try:
        ours = folder / "ours.safetensors"
        tmp = folder / ".ours.safetensors.lorad-tmp"
        tmp.write_bytes(lora_bytes(seed=7))
        mine.add(signature(tmp))  # rename keeps inode, size and mtime
        os.rename(tmp, ours)
        theirs = make_lora(folder / "theirs.safetensors", seed=8)  # settles after ours would have
        wait_for(lambda: theirs in got.paths(), 10, what="their file")
        assert got.paths() == [theirs]
    finally:
        watcher.stop()


def test_polling_folders_see_new_files(folder: Path) -> None:
    watcher, got = start_watcher(folder, poll=True)
    try:
        path = make_lora(folder / "p.safetensors")
        wait_for(lambda: got.paths() == [path], 15, what="the polled file")
    finally:
        watcher.stop()


def test_lost_events_ask_for_a_reconcile(folder: Path) -> None:
    """watchdog hands an inotify queue overflow to each watch's handler as an EventsLostEvent."""
    from lorad.log import captured

    watcher, _got = start_watcher(folder)
    try:
        before = watcher.reconciles
        with captured() as logs:
            _Handler(watcher, polling=False).dispatch(EventsLostEvent(str(folder), is_directory=True))
            wait_for(lambda: watcher.reconciles > before, 10, what="the reconcile the lost events asked for")
        asked = [e["reason"] for e in logs if e["event"] == "reconcile scan requested"]
        assert asked == ["inotify queue overflow"]
    finally:
        watcher.stop()


def test_a_real_inotify_queue_overflow_makes_the_daemon_rescan(rig: tuple[Path, Daemon]) -> None:
    """The kernel queues at most max_queued_events inotify events per instance, then one
    IN_Q_OVERFLOW, and drops the rest. The daemon, stopped, reads none: a flood of events in the
    watched folder overflows its queue, and a LoRA written after the flood leaves no event at all.
    Only the rescan the overflow asks for can find it (the schedule's is an hour away)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 20:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to flood in a test")
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    daemon.start()
    wait_for(lambda: cli_json(config, "status")["reconciles"] >= 1, 60, 0.2, "the start reconcile")
    before = cli_json(config, "status")["reconciles"]
    assert daemon.proc is not None
    sigstopped(daemon)
    try:
        noise = loras / "noise.txt"  # not a LoRA: create, open, close-write and delete, 4 events
        for _ in range(limit // 2 + 1000):
            os.close(os.open(noise, os.O_CREAT | os.O_WRONLY, 0o644))
            os.unlink(noise)
        lost = make_lora(loras / "lost.safetensors")
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: show_if_known(config, str(lost)), 60, 0.2, "the LoRA written after the overflow")
    asked = [e.get("reason") for e in daemon.log_events() if e.get("event") == "reconcile scan requested"]
    assert "inotify queue overflow" in asked, asked
    assert cli_json(config, "status")["reconciles"] > before


def test_a_dead_observer_is_restarted_and_reconciled(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        before = watcher.reconciles
        for observer in watcher._observers:
            observer.stop()  # the thread dies as it does after an exception in a handler
            observer.join(5)
        path = make_lora(folder / "during.safetensors")
        wait_for(lambda: watcher.restarts == 1 and watcher.reconciles > before, 10, what="the restart")
        wait_for(lambda: got.paths() == [path], 10, what="the file written while the observer was dead")
        assert watcher.observers_alive()
    finally:
        watcher.stop()


# ---------------------------------------------------------------------------------------------
# Files that are not LoRAs, or not yet takeable: refused with a reason, once, never opened


class RefusalLog:
    """What the watcher reported as refused, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Path, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path, refusal) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.seen.append((path, refusal.cause, refusal.reason))

    def causes(self) -> dict[Path, str]:
        with self._lock:
            return {p: c for p, c, _ in self.seen}


def watcher_with_refusals(folder: Path, on_settled=None, **kwargs):  # type: ignore[no-untyped-def]
    collector, refused = Collector(), RefusalLog()
    watcher = Watcher([WatchDir(path=folder)], SETTLE, 0.1, on_settled or collector, on_refused=refused, **kwargs)
    watcher.start()
    wait_for(lambda: watcher.reconciles >= 1, 10, what="the start reconcile")
    return watcher, collector, refused


def test_settler_refuses_a_fifo_by_its_mode_without_opening_it(folder: Path) -> None:
    clock = FakeClock()
    settler = Settler(1.0, clock)
    fifo = folder / "pipe.safetensors"
    os.mkfifo(fifo)
    settler.hint(fifo, confirmed=True)
    clock.now += 2
    done = []
    judge = threading.Thread(target=lambda: done.append(settler.due()), daemon=True)
    judge.start()
    judge.join(10)
    if judge.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("judging a FIFO blocked")
    assert done == [[]]
    [refused] = settler.take_refused()
    assert refused.path == fifo and refused.refusal.cause == "not-regular"
    assert "a FIFO (named pipe), not a regular file" in refused.refusal.reason
    assert settler.pending() == [] and settler.take_refused() == []


def test_non_files_and_non_loras_are_refused_once_each_with_their_cause(folder: Path, tmp_path: Path) -> None:
    import socket
    import zipfile

    fifo = folder / "deep" / "er" / "pipe.safetensors"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # there before the start reconcile, as in the report
    watcher, got, refused = watcher_with_refusals(folder)
    try:
        (folder / "dir.safetensors").mkdir()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(folder / "sock.safetensors"))
        (folder / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle
        with zipfile.ZipFile(folder / "ckpt.safetensors", "w") as z:  # torch.save's container
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        (folder / "cut.safetensors").write_bytes(lora_bytes()[:-10])
        outside = make_lora(tmp_path / "elsewhere" / "real.safetensors")
        (folder / "link.safetensors").symlink_to(outside)
        good = make_lora(folder / "good.safetensors")  # dropped after all of those: still taken
        want = {fifo: "not-regular", folder / "dir.safetensors": "not-regular",
                folder / "sock.safetensors": "not-regular", folder / "model.safetensors": "pickle",
                folder / "ckpt.safetensors": "pickle", folder / "cut.safetensors": "incomplete",
                folder / "link.safetensors": "outside"}  # fmt: skip
        wait_for(lambda: refused.causes() == want, 15, what=f"refusals {want}, got {refused.causes()}")
        wait_for(lambda: got.paths() == [good], 10, what="the good file")
        reasons = {p: r for p, _, r in refused.seen}
        assert "FIFO" in reasons[fifo] and "directory" in reasons[folder / "dir.safetensors"]
        assert "socket" in reasons[folder / "sock.safetensors"]
        assert "never unpickles" in reasons[folder / "ckpt.safetensors"]
        assert str(outside) in reasons[folder / "link.safetensors"]
        assert set(watcher.refused()) == set(want)
        # Rescans look at every one again, and say nothing new: one report per path and cause.
        for _ in range(2):
            before = watcher.reconciles
            watcher.request_reconcile("test")
            wait_for(lambda: watcher.reconciles > before, 10, what="a rescan")
        # Refusals are reported in the order the files settled: a second report of any of those
        # the rescans hinted comes before the refusal of a file written after the last rescan.
        later = folder / "later.safetensors"
        later.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
        wait_for(lambda: later in refused.causes(), 10, what="the refusal of the file written after the rescans")
        assert [(p, c) for p, c, _ in refused.seen[len(want):]] == [(later, "pickle")]
        assert set(got.paths()) == {good}  # (a scan hands settled files on again; the daemon ignores its own)
        sock.close()
    finally:
        watcher.stop()


def test_a_rescan_reexamines_a_refused_file_whose_stamp_did_not_change(folder: Path) -> None:
    """A chmod, or bytes rewritten in place with the old mtime, changes none of (size, mtime,
    inode): only a rescan that looks at refused files again can take such a file."""
    data = lora_bytes(seed=2)
    path = folder / "fixed.safetensors"
    path.write_bytes(b"\0" * len(data))  # refused: not a safetensors file
    watcher, got = start_watcher(folder)
    try:
        wait_for(lambda: path in watcher.refused(), 10, what="the zeroed file refused")
        assert got.paths() == [] and watcher.settler.pending() == []
        before = os.stat(path)
        with open(path, "r+b") as f:  # same inode, same size
            f.write(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert signature(path) == Signature(before.st_size, before.st_mtime_ns, before.st_ino)
        later = make_lora(folder / "later.safetensors", seed=1)  # settles after a revived file would have
        wait_for(lambda: later in got.paths(), 10, what="the file written after the rewrite")
        assert got.paths() == [later]  # the events alone do not revive it...
        watcher.request_reconcile("lorad rescan")
        wait_for(lambda: path in got.paths(), 10, what="the file, after the rescan")  # ...a rescan does
    finally:
        watcher.stop()


def test_a_transient_failure_is_retried_with_backoff_not_dropped(folder: Path, tmp_path: Path) -> None:
    """Taking a file in writes to a real SQLite file that another process holds locked: the file
    is taken once the lock is gone, without waiting for a scan, and the failure is logged once."""
    import subprocess
    import sys

    from lorad.library.db import migrate, repo
    from lorad.library.db.session import Database
    from lorad.log import captured

    url = f"sqlite:///{tmp_path / 'lorad.db'}"
    migrate.upgrade(url)
    db = Database(url, busy_timeout_ms=200)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN IMMEDIATE')\n"
         "print('locked', flush=True); time.sleep(float(sys.argv[2]))",
         str(tmp_path / "lorad.db"), "3"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    taken: list[Path] = []

    def on_settled(path: Path, watch: WatchDir, sig: Signature) -> None:
        with db.write() as s:
            repo.record_event(s, "ingested", "test", path=str(path))
        taken.append(path)

    with captured() as logs:
        watcher = Watcher([WatchDir(path=folder)], SETTLE, 0.1, on_settled)
        watcher.start()
        try:
            path = make_lora(folder / "a.safetensors")
            wait_for(lambda: taken == [path], 30, what="the file, taken once the lock was released")
            assert holder.wait(10) == 0
        finally:
            watcher.stop()
            db.close()
    retries = [e for e in logs if e["event"].startswith("cannot take the file in for now")]
    assert len(retries) == 1 and "database is locked" in retries[0]["error"]
    assert not any(e["log_level"] == "error" for e in logs)


def test_a_file_name_that_is_not_utf8_is_handed_on(folder: Path) -> None:
    # A guard: the watcher always did this; the library records such names (test_library).
    watcher, got = start_watcher(folder)
    try:
        raw = os.fsencode(folder) + b"/caf\xe9.safetensors"
        with open(raw, "wb") as f:
            f.write(lora_bytes(seed=5))
        wait_for(lambda: [os.fsencode(p) for p in got.paths()] == [raw], 10, what="the non-UTF-8 name")
    finally:
        watcher.stop()
