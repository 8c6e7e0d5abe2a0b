"""Hostile and unlucky files against the real daemon (a subprocess), driven by the real `lorad` CLI:
FIFOs and other non-files in watched folders and at LoRAs' paths, unreadable files, pickles, a
symlink leading out, a file name that is not UTF-8, a database another process holds locked, and
the modes of the state lorad keeps. Each must neither stall the daemon nor be forgotten, and each
refusal must say why, once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from tests._daemon_fixtures import Daemon, cli, cli_json, lora_bytes, make_lora, wait_for, write_config
from tests._store_fixtures import WITHOUT_DAC
from tests.test_daemon_e2e import active, by_path, reduced_everywhere, sha_of


def refused_in_list(config: Path) -> dict[str, dict[str, Any]]:
    return {x["path"]: x["refused"] for x in cli_json(config, "list") if x.get("refused")}


def refused_as(config: Path, want: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """The refused paths in `lorad list`, once they are exactly `want` (path -> cause)."""
    refused = refused_in_list(config)
    return refused if {p: x["cause"] for p, x in refused.items()} == want else None


def said(daemon: Daemon, event: str) -> Counter[str]:
    """How often the daemon logged `event`, per path."""
    return Counter(e.get("path", "") for e in daemon.log_events() if e.get("event") == event)


def errors_logged(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("level") in ("error", "critical") or "exception" in e]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def rescan_twice_then_refuse_one_more(daemon: Daemon, folder: Path) -> None:
    """Two rescans, each waited for (the status's count of reconcile scans), then a pickle dropped
    into `folder`, waited for until it is refused. Files are judged and refused in the order they
    settled, so any refusal the rescans brought about is logged by then: a check that a file was
    NOT refused again can be made."""
    for _ in range(2):
        asked = cli_json(daemon.config, "rescan")
        wait_for(lambda: cli_json(daemon.config, "status")["reconciles"] > asked["reconciles_before"], 60, 0.2,
                 "the rescan")  # fmt: skip
    later = folder / "later.safetensors"
    later.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    wait_for(lambda: said(daemon, "refused")[str(later)] == 1, 60, 0.2, "the refusal of the file dropped last")


def test_fifos_stall_nothing_and_the_state_is_private(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    early = loras / "deep" / "er" / "pipe.safetensors"  # found by the start-up reconcile
    early.parent.mkdir(parents=True)
    os.mkfifo(early)
    daemon.start()  # ready at all: the start-up scan did not block on the FIFO

    late = loras / "late.safetensors"
    os.mkfifo(late)
    (loras / "dir.safetensors").mkdir()
    good = loras / "good.safetensors"
    good.write_bytes(lora_bytes(seed=1))
    os.chmod(good, 0o660)  # the user's mode, which lorad's own write must keep
    wait_for(lambda: reduced_everywhere(config, [good]), 90, 0.2, "the LoRA dropped after the FIFOs")
    want = {str(early): "not-regular", str(late): "not-regular", str(loras / "dir.safetensors"): "not-regular"}
    refused = wait_for(lambda: refused_as(config, want), 30, 0.2, "the FIFOs and the folder listed as refused")
    assert "a FIFO (named pipe), not a regular file" in refused[str(late)]["reason"]
    assert "a directory" in refused[str(loras / "dir.safetensors")]["reason"]
    table = cli(config, "list").stdout
    assert "refused (fix the file, then `lorad rescan`):" in table
    assert f"{late}: not-regular: a FIFO (named pipe)" in table
    shown = cli_json(config, "show", str(late))
    assert shown["id"] is None and shown["refused"]["cause"] == "not-regular"
    assert "refused since" in cli(config, "show", str(late)).stdout
    assert cli_json(config, "status")["refused_files"] == 3

    # A FIFO put where an ingested LoRA was: verify, revert and show answer, saying why.
    good_mode = mode(good)
    os.unlink(good)
    os.mkfifo(good)
    started = time.monotonic()
    report = cli_json(config, "verify")
    assert report["refused"] == [{"path": str(good), "reason": "a FIFO (named pipe), not a regular file; lorad never opens those"}]
    assert f"refused {good}: a FIFO" in cli(config, "verify").stdout
    reverted = cli(config, "revert", str(good), check=False)
    assert reverted.returncode == 2 and "a FIFO (named pipe), not a regular file" in reverted.stderr
    assert time.monotonic() - started < 30  # nothing waited on the FIFO
    lora = by_path(cli_json(config, "list"))[str(good)]
    assert lora["refused"]["cause"] == "not-regular" and active(lora)["kind"] == "reduced"
    assert cli_json(config, "status")["loras"] == 1

    # The state is private; the watched file lorad wrote kept the user's mode (seen before the FIFO).
    assert good_mode == 0o660
    state = tmp / "state"
    assert mode(state) == 0o700 and mode(state / "lorad.lock") == 0o600
    assert {p.name: mode(p) for p in state.glob("lorad.db*")} == {n: 0o600 for n in ("lorad.db", "lorad.db-wal", "lorad.db-shm")}
    blobs = [p for p in (state / "store" / "objects").rglob("*") if p.is_file()]
    assert len(blobs) == 2 and {mode(b) for b in blobs} == {0o400}
    os.unlink(good)

    # A restart with the FIFOs still there comes up, and says each refusal once more, once.
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    wait_for(lambda: cli_json(config, "status")["refused_files"] == 3, 30, 0.2, "the refusals after the restart")
    rescan_twice_then_refuse_one_more(daemon, loras)
    counts = said(daemon, "refused")
    assert {p: counts[p] for p in want} == {p: 2 for p in want}  # once per run, not per scan
    assert errors_logged(daemon) == []


def test_refused_files_say_why_and_a_rescan_takes_them_once_fixed(tmp_path: Path) -> None:
    """The daemon without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, as a service user is: a mode-000
    file is unreadable to it. Also a pickle, a zip checkpoint, a symlink leading outside, and a
    LoRA whose name is not UTF-8."""
    daemon = Daemon(write_config(tmp_path), tmp_path / "daemon.log", prefix=WITHOUT_DAC)
    config, loras = daemon.config, tmp_path / "loras"
    locked = make_lora(loras / "locked.safetensors", seed=2)
    os.chmod(locked, 0)
    (loras / "old.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    with zipfile.ZipFile(loras / "ckpt.safetensors", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    outside = make_lora(tmp_path / "elsewhere" / "real.safetensors", seed=3)
    (loras / "link.safetensors").symlink_to(outside)
    latin = Path(os.fsdecode(os.fsencode(loras) + b"/caf\xe9.safetensors"))
    make_lora(latin, seed=4)
    latin_original = sha_of(latin)
    daemon.start()
    try:
        want = {str(locked): "unreadable", str(loras / "old.safetensors"): "pickle",
                str(loras / "ckpt.safetensors"): "pickle", str(loras / "link.safetensors"): "outside"}  # fmt: skip
        refused = wait_for(lambda: refused_as(config, want), 60, 0.2, "four refusals")
        assert "permission denied" in refused[str(locked)]["reason"]
        assert "never unpickles" in refused[str(loras / "ckpt.safetensors")]["reason"]
        assert str(outside) in refused[str(loras / "link.safetensors")]["reason"]

        # The file named in latin-1 is a LoRA like any other, addressed by its exact bytes.
        lora = wait_for(lambda: reduced_everywhere(config, [latin]), 90, 0.2, "the non-UTF-8 name")[str(latin)]
        assert os.fsencode(lora["path"]) == os.fsencode(latin)
        reverted = cli_json(config, "revert", str(latin))
        assert active(reverted)["kind"] == "original" and sha_of(latin) == latin_original
        assert cli_json(config, "show", str(latin))["id"] == lora["id"]

        os.chmod(locked, 0o644)  # fixed; its size, mtime and inode are as they were
        cli(config, "rescan")
        wait_for(lambda: reduced_everywhere(config, [locked]), 90, 0.2, "the file made readable, after a rescan")
        assert set(refused_in_list(config)) == set(want) - {str(locked)}
        rescan_twice_then_refuse_one_more(daemon, loras)
        counts = said(daemon, "refused")
        assert {p: counts[p] for p in want} == {p: 1 for p in want}  # one line per path and cause
        assert errors_logged(daemon) == []
    finally:
        daemon.stop(signal.SIGTERM)


def test_a_locked_database_delays_an_ingest_but_does_not_drop_it(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    with open(config, "a") as f:  # a write gives up after 1 s; the lock is held for 3
        f.write("database_busy_timeout: 1\n")
    daemon.start()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN IMMEDIATE')\n"
         "print('locked', flush=True); time.sleep(3)", str(tmp / "state" / "lorad.db")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    path = make_lora(tmp / "loras" / "while-locked.safetensors", seed=7)
    assert cli_json(config, "status")["loras"] == 0  # reads still answer while the lock is held
    assert holder.wait(30) == 0
    # The reconcile timer is an hour away: only a retry can take the file in.
    wait_for(lambda: reduced_everywhere(config, [path]), 90, 0.3, "the file whose ingest met a locked database")
    warned = [e for e in daemon.log_events() if e.get("event", "").startswith("cannot take the file in for now")]
    assert warned and all("database is locked" in e["error"] for e in warned)
    assert said(daemon, "file settled")[str(path)] >= 2  # handed on again, not forgotten
    with sqlite3.connect(tmp / "state" / "lorad.db") as conn:
        assert conn.execute("SELECT count(*) FROM loras").fetchone() == (1,)
    assert json.loads(cli(config, "verify", "--json").stdout)["ok"] is True
