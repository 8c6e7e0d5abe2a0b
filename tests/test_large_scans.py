"""Libraries of many files against the real daemon (a subprocess): a restart takes the files it
knows by their recorded (inode, size, mtime) and hashes none of them, and the first scan of a
folder full of files shows its progress in `lorad status` and in the log."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lorad.daemon.watch import INGEST_DELAY_ENV, PROGRESS_EVERY
from tests._daemon_fixtures import Daemon, cli_here, cli_json, make_lora, wait_for, write_config
from tests.test_daemon_e2e import reduced_everywhere


def closed_window() -> str:
    """A reduction window that opens hours from now: jobs are queued and wait."""
    start = datetime.now() + timedelta(hours=6)
    return f'  window: "{start:%H:%M}-{start + timedelta(minutes=1):%H:%M}"'


def status(config: Path) -> dict[str, Any]:
    return cli_json(config, "status")


def first_scan_done(config: Path, loras: int) -> dict[str, Any] | None:
    """The status once the first reconcile scan is done, `loras` LoRAs are recorded and no file
    waits to be taken in."""
    s = status(config)
    done = s["reconciles"] >= 1 and s["pending_files"] == 0 and s["ingesting"] is None and s["loras"] == loras
    return s if done else None


def test_a_restart_hashes_no_known_file_and_queues_what_a_new_policy_asks(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    files = [make_lora(tmp / "loras" / f"known-{i}.safetensors", seed=i) for i in range(6)]
    daemon.start()
    wait_for(lambda: reduced_everywhere(config, files), 120, 0.2, "every file reduced")
    assert daemon.stop() == 0

    # The same policies, reductions held back by a closed window: only the records are at work.
    config.write_text(config.read_text().replace("  retry_every: 2s\n", "  retry_every: 2s\n" + closed_window() + "\n"))
    daemon.start()
    s = wait_for(lambda: first_scan_done(config, len(files)), 60, 0.2, "the first reconcile after the restart")
    assert s["queue"] == {"pending": 0, "running": 0, "done": len(files), "failed": 0}
    # A file dropped afterwards must be hashed (it is stored): once it is in, the count says the
    # known files were never read, neither at the scan nor since.
    new = make_lora(tmp / "loras" / "new.safetensors", seed=50)
    s = wait_for(lambda: first_scan_done(config, len(files) + 1), 60, 0.2, "the new file taken in")
    assert s["files_hashed"] == 1
    events = daemon.log_events()
    unchanged = [e for e in events if e.get("event") == "files unchanged since lorad last saw them"]
    assert [(e["files"], e["jobs_queued"]) for e in unchanged] == [(0, 0), (len(files), 0)]
    settled = [e["path"] for e in events if e.get("event") == "file settled"]
    assert sorted(settled) == sorted(str(p) for p in [*files, new])  # each once, the known ones before the restart
    assert daemon.stop() == 0

    # The folder's policy changed while lorad was down: the files it passed by get their jobs, in
    # one transaction, still unread.
    config.write_text(config.read_text().replace("    policy: default\n", "    policy: tiny\n", 1))
    daemon.start()
    s = wait_for(lambda: first_scan_done(config, len(files) + 1), 60, 0.2, "the reconcile under the new policy")
    assert s["queue"]["pending"] == 1 + len(files) + 1  # the new file's first job, then one each under tiny
    jobs = cli_json(config, "show", str(files[0]))["jobs"]
    assert [(j["policy"], j["state"]) for j in jobs] == [("default", "done"), ("tiny", "pending")]
    make_lora(tmp / "loras" / "newer.safetensors", seed=51)
    s = wait_for(lambda: first_scan_done(config, len(files) + 2), 60, 0.2, "another new file taken in")
    assert s["files_hashed"] == 1


def test_the_first_scan_of_a_full_folder_shows_its_progress(rig: tuple[Path, Daemon]) -> None:
    tmp, daemon = rig
    config = daemon.config
    count = 60
    for i in range(count):
        make_lora(tmp / "loras" / f"lora-{i:03d}.safetensors", seed=i)
    config.write_text(config.read_text().replace("  retry_every: 2s\n", "  retry_every: 2s\n" + closed_window() + "\n"))
    delay = 0.1  # so the ingest takes over PROGRESS_EVERY seconds on any machine
    assert count * delay > PROGRESS_EVERY
    daemon.env[INGEST_DELAY_ENV] = str(delay)
    daemon.start()

    def midway() -> dict[str, Any] | None:
        ingesting = status(config)["ingesting"]
        return ingesting if ingesting and 0 < ingesting["done"] < ingesting["total"] else None

    def shown_midway() -> str | None:
        code, table, _ = cli_here(config, "status")
        assert code == 0
        line = next((x for x in table.splitlines() if x.startswith("ingesting: ")), None)
        return line if line and 0 < int(line.split()[1]) < count else None

    assert wait_for(midway, 60, 0.1, "the status to show the ingest under way")["total"] == count
    line = wait_for(shown_midway, 60, 0.1, "`lorad status` to show the ingest under way")
    assert line.endswith(f" of {count} files found by a scan")

    wait_for(lambda: first_scan_done(config, count), 60, 0.2, "every file taken in")
    events = daemon.log_events()
    found = [e for e in events if e.get("event") == "ingesting files a scan found"]
    under_way = [e for e in events if e.get("event") == "ingesting"]
    finished = [e for e in events if e.get("event") == "ingest done"]
    assert [(e["found"], e["of"]) for e in found] == [(count, count)]
    assert [e["files"] for e in finished] == [count]
    # Every few seconds, not per file: at least one line while it ran (it ran past PROGRESS_EVERY),
    # and no more than its duration allows.
    assert 1 <= len(under_way) <= finished[0]["seconds"] / PROGRESS_EVERY + 1
    assert all(0 < e["done"] < count and e["of"] == count for e in under_way)


def test_listing_originals_reads_no_blob(rig: tuple[Path, Daemon]) -> None:
    """Originals that were never reduced: their module ranks were recorded when they were stored,
    so `list` shows them with the store out of reach."""
    tmp, daemon = rig
    config = daemon.config
    config.write_text(config.read_text().replace("  retry_every: 2s\n", "  retry_every: 2s\n" + closed_window() + "\n"))
    for i in range(3):
        make_lora(tmp / "loras" / f"o-{i}.safetensors", seed=i, rank=4 + i)
    daemon.start()
    wait_for(lambda: first_scan_done(config, 3), 60, 0.2, "the originals taken in")
    objects = tmp / "state" / "store" / "objects"
    os.rename(objects, objects.with_name("objects-away"))
    try:
        listed = cli_json(config, "list")
    finally:
        os.rename(objects.with_name("objects-away"), objects)
    assert sorted(v["ranks"]["max"] for x in listed for v in x["variants"]) == [4, 5, 6]
    assert daemon.stop(signal.SIGTERM) == 0
