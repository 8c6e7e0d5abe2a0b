"""The watcher: settle rules on real files, a real watchdog observer, reconcile scans."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from lorad.config import WatchDir
from lorad.watch import (
    Settler,
    Signature,
    Watcher,
    fs_type,
    partial_siblings,
    scan_folder,
    should_poll,
    signature,
)
from tests._daemon_fixtures import lora_bytes, make_lora, wait_for, write_slowly

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
        time.sleep(SETTLE * 3)
        assert got.paths() == [path]
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
        time.sleep(SETTLE * 2)
        assert got.paths() == []
        final = folder / "dl.safetensors"
        os.rename(part, final)
        wait_for(lambda: got.paths() == [final], 10, what="the renamed download")
    finally:
        watcher.stop()


def test_an_aria2_sibling_holds_the_file_back(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        control = folder / "big.safetensors.aria2"
        control.write_bytes(b"aria2 control")
        path = make_lora(folder / "big.safetensors")
        time.sleep(SETTLE * 4)
        assert got.paths() == []
        control.unlink()
        wait_for(lambda: got.paths() == [path], 10, what="the file after its .aria2 went away")
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
        theirs = make_lora(folder / "theirs.safetensors", seed=8)
        wait_for(lambda: got.paths() == [theirs], 10, what="their file")
        time.sleep(SETTLE * 3)
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


def test_inotify_overflow_triggers_a_reconcile(folder: Path) -> None:
    watcher, got = start_watcher(folder)
    try:
        missed = make_lora(folder / "missed.safetensors")
        wait_for(lambda: got.paths() == [missed], 10)
        before = watcher.reconciles
        # watchdog reports IN_Q_OVERFLOW only through this logger; emit what it emits.
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
        wait_for(lambda: watcher.reconciles > before, 10, what="the overflow reconcile")
    finally:
        watcher.stop()


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
