"""Fleet roles: which node watches each watched folder, and the nodes as their heartbeats left them.

Every node runs workers that claim jobs from the shared queue; each watched folder is watched (its
events followed, scanned, its files taken in) by one node at a time, the holder of its row in
`folder_leases`. Every `lease_seconds / 3` a node renews its `nodes` row and, for each folder, takes
the lease when it is free or expired, or renews its own, in ONE statement:

    UPDATE folder_leases SET node = me, expires_at = now + lease, renewed_at = now
     WHERE folder = f AND (node = me OR expires_at < now)

(after an INSERT ... ON CONFLICT DO NOTHING for a folder that has no row yet). PostgreSQL
re-checks the WHERE of a row another transaction changed meanwhile, so of two nodes racing for an
expired lease one updates a row and the other none: two nodes never both win. Times are the
database's clock (PostgreSQL's statement time, repo.db_now; on SQLite, where one node always
wins, this machine's), so nodes' clocks may differ.

A node may act on a folder only while it can show the lease: until `lease_seconds` (less a margin)
after the start of its last successful renewal, measured on its own monotonic clock. The database's
expiry is later than that (the database's time is taken after that start), so another node can take the folder
only once this one has stopped. A renewal that finds another node there, or none that succeeds
before that deadline (the database is unreachable, the process stalled), stops the watching at once
(lorad.daemon.watch.Watcher.lead). A clean shutdown deletes the node's leases and its row, so
another node takes its folders at its next renewal instead of after the expiry.

A draining node (`lorad drain`) gives its folders up the same way (its leases deleted, the watching
stopped at once) but keeps its row, marked `draining`, and its heartbeat; while it drains, each round
deletes any lease of its own left (a drain while the database was unreachable) and takes none.
`lorad resume` ends the drain: the next round takes the folders that are free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from lorad.library.db import repo
from lorad.library.db.models import FolderLease, Node
from lorad.library.db.session import Database
from lorad.log import get_logger

log = get_logger("lorad.fleet")


class Fleet:
    def __init__(
        self,
        db: Database,
        node: str,
        folders: Sequence[Path],
        lease_seconds: float,
        device: str,
        running_jobs: Callable[[], int] = lambda: 0,
        on_lead: Callable[[Path, float], None] = lambda _f, _until: None,
        on_lose: Callable[[Path], None] = lambda _f: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """on_lead(folder, until): this node holds the folder's lease until `until` (`clock`
        time); on_lose(folder): it does not (another node has it, or it was given up)."""
        self.db = db
        self.node = node
        self.folders = sorted({Path(f) for f in folders}, key=str)  # one order: no deadlock between nodes
        self.lease = timedelta(seconds=lease_seconds)
        self.lease_seconds = lease_seconds
        self.every = max(0.2, lease_seconds / 3)
        self.margin = min(1.0, lease_seconds / 10)
        self.device = device
        self._running_jobs = running_jobs
        self._on_lead = on_lead
        self._on_lose = on_lose
        self._clock = clock
        self._held: dict[Path, float] = {}  # folder -> until (clock time)
        self._started_at: datetime | None = None
        self._failing = False
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._round = threading.RLock()  # one round (or a drain) at a time

    # life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorad-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def release(self) -> None:
        """Give up this node's leases and its row (a clean shutdown): the others take its folders
        at their next renewal. Call after the watching stopped."""
        self.stop()
        with self._lock:
            held, self._held = list(self._held), {}
        for folder in held:
            self._on_lose(folder)
        try:
            with self.db.write() as s:
                s.execute(delete(FolderLease).where(FolderLease.node == self.node))
                s.execute(delete(Node).where(Node.name == self.node))
        except Exception as e:  # noqa: BLE001 - the leases then expire on their own
            log.warning("could not give up the folder leases; they expire on their own", error=str(e),
                        lease_seconds=self.lease_seconds)  # fmt: skip
        else:
            if held:
                log.info("gave up the folder leases", folders=[str(f) for f in held])

    def set_draining(self, draining: bool) -> list[Path]:
        """Drain (give up every folder now and take none until the drain ends; the node's row says
        `draining`) or end the drain. Returns the folders given up. The watching stops at once;
        a database that does not answer now is told at the next round (the leases lapse anyway:
        no round renews them)."""
        with self._round:
            self.draining = draining
            with self._lock:
                held, self._held = (list(self._held), {}) if draining else ([], self._held)
            for folder in held:
                self._on_lose(folder)
            if held:
                log.info("draining: gave up the folders", folders=[str(f) for f in held], node=self.node)
            try:
                self.beat()  # records the drain (or its end) and, ended, takes the free folders
            except Exception as e:  # noqa: BLE001 - beat says so itself; the next round tries again
                log.warning("could not record the drain yet", error=str(e))
            return held

    def _run(self) -> None:
        due = self._clock() + self.every
        while not self._stop.wait(max(0.0, due - self._clock())):
            due = self._clock() + self.every  # a round that waited on the database counts
            self.beat()

    # one round ---------------------------------------------------------------------------

    def beat(self) -> dict[Path, bool]:
        """Renew this node's row and take or renew each folder's lease; tell the watcher what it
        holds. A round that fails changes nothing: what is held expires at its own deadline."""
        with self._round:
            return self._beat()

    def _beat(self) -> dict[Path, bool]:
        began = self._clock()
        try:
            won = self._renew()
        except Exception as e:  # noqa: BLE001 - the next round tries again
            if not self._failing:
                log.warning("cannot renew the folder leases; each folder stops being watched when its lease runs out",
                            error=str(e), lease_seconds=self.lease_seconds)  # fmt: skip
            self._failing = True
            return self.holding()
        if self._failing:
            log.info("folder leases renewed again")
            self._failing = False
        until = began + self.lease_seconds - self.margin
        changes: list[tuple[Path, bool]] = []
        with self._lock:
            for folder in self.folders:
                had = folder in self._held
                if won[folder]:
                    self._held[folder] = until
                elif had:
                    del self._held[folder]
                if won[folder] != had:
                    changes.append((folder, won[folder]))
        for folder, gained in changes:
            if gained:
                log.info("watching folder: this node holds its lease", folder=str(folder), node=self.node)
            else:
                log.warning("not watching folder: another node holds its lease", folder=str(folder), node=self.node)
        for folder in self.folders:  # every round: the watcher extends its deadline
            if won[folder]:
                self._on_lead(folder, until)
            else:
                self._on_lose(folder)
        return dict(won)

    def _renew(self) -> dict[Path, bool]:
        with self.db.write() as s:
            now = repo.db_now(s)
            if self._started_at is None:
                self._started_at = now
            self._upsert_node(s, now)
            won: dict[Path, bool] = {}
            if self.draining:  # hold nothing: a lease left from before (unrecorded drain) goes
                s.execute(delete(FolderLease).where(FolderLease.node == self.node))
                return {folder: False for folder in self.folders}
            for folder in self.folders:
                key = str(folder)
                taken = self._insert(s, FolderLease, {"folder": key, "node": self.node,
                                                      "expires_at": now + self.lease, "renewed_at": now})  # fmt: skip
                if not taken:
                    result = s.execute(
                        update(FolderLease)
                        .where(FolderLease.folder == key, or_(FolderLease.node == self.node, FolderLease.expires_at < now))
                        .values(node=self.node, expires_at=now + self.lease, renewed_at=now)
                    )
                    taken = result.rowcount == 1  # type: ignore[attr-defined]
                won[folder] = taken
            return won

    def _upsert_node(self, s: Session, now: datetime) -> None:
        values = {"device": self.device, "heartbeat_at": now, "running_jobs": int(self._running_jobs()),
                  "draining": self.draining}  # fmt: skip
        if not self._insert(s, Node, {"name": self.node, "started_at": self._started_at, **values}):
            s.execute(update(Node).where(Node.name == self.node).values(**values))

    def _insert(self, s: Session, model: Any, values: dict[str, Any]) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; whether a row was inserted."""
        if self.db.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        result = s.execute(insert(model).values(**values).on_conflict_do_nothing())
        return result.rowcount == 1  # type: ignore[attr-defined]

    # reading -----------------------------------------------------------------------------

    def holding(self) -> dict[Path, bool]:
        """Each folder and whether this node may act on it now (its lease shown and unexpired)."""
        now = self._clock()
        with self._lock:
            return {f: self._held.get(f, 0.0) > now for f in self.folders}

    def view(self) -> dict[str, Any]:
        """The fleet as the database has it (`lorad status`): the nodes, each folder's watcher."""
        with self.db.read() as s:
            now = repo.db_now(s)
            nodes = s.scalars(select(Node).order_by(Node.name)).all()
            leases = {row.folder: row for row in s.scalars(select(FolderLease)).all()}
        folders = []
        for folder in self.folders:
            row = leases.get(str(folder))
            live = row is not None and row.expires_at >= now
            folders.append({
                "path": str(folder),
                "node": row.node if live and row is not None else None,
                "expires_in_s": round((row.expires_at - now).total_seconds(), 1) if live and row is not None else None,
                "here": self.holding().get(folder, False),
            })  # fmt: skip
        return {
            "nodes": [{
                "name": n.name,
                "device": n.device,
                "started_at": n.started_at.isoformat(),
                "heartbeat_at": n.heartbeat_at.isoformat(),
                "heartbeat_age_s": round((now - n.heartbeat_at).total_seconds(), 1),
                "running_jobs": n.running_jobs,
                "draining": n.draining,
                "alive": (now - n.heartbeat_at).total_seconds() < self.lease_seconds,
                "this": n.name == self.node,
            } for n in nodes],  # fmt: skip
            "folders": folders,
        }
