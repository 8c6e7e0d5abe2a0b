"""Watching folders: events are hints, scans are truth, and a file is taken only once settled.

Candidates are `.safetensors` files and PEFT adapter folders (adapter_config.json +
adapter_model.safetensors; lorad.library.adapter_folder), each folder one LoRA: an event on any file in
such a folder (or on either PEFT file, whichever arrives first) is a hint for the folder, and a
`.safetensors` file inside it is never a candidate of its own.

A candidate `.safetensors` file is handed on (`on_settled`) only when all of these hold:
  - a close-write or moved-to event, a poll or a scan saw it (a "created" event alone does not
    count: it fires when writing starts);
  - its (size, mtime_ns, inode) stayed unchanged for `settle_seconds`;
  - no `.part`/`.crdownload`/`.aria2`/`.incomplete`/`.tmp` sibling exists (downloaders that
    preallocate the full size make a stable size prove nothing);
  - it is a regular file (stat first: a FIFO, socket, device or directory is never opened), inside
    the watched folders once symlinks are followed, readable, and its safetensors header parses
    with the data length matching the file size.
A folder is handed on when its signature (every entry's size, mtime and inode) stayed unchanged for
`settle_seconds`, no download marker lies in it or beside it, it is complete and consistent
(lorad.library.adapter_folder.refusal) and, looked at once more in a short-lived process, open_lora reads
it. A folder copied file by file is refused as incomplete until the copy is done.
A file that fails one of the last rules is refused (lorad.library.refusals): its cause is logged once per
path and cause and handed to `on_refused` (the daemon records it for `lorad list`), and it is
left alone until its (size, mtime, inode) change or a reconcile scan looks again: a rescan
re-examines every file, refused ones included (a chmod changes none of the three).
Taking a file in (`on_settled`) may fail for a while (the database is locked, the disk is full,
the database server cannot be reached: a TransientError): the file is tried again with backoff, not
dropped until the next scan, and at once when the database answers again (`retry_now`). An
unreachable database is said once, by its health (lorad.library.db.session.Health), not per file.
A reconcile scan runs at start, after an inotify overflow, when an observer thread died, and on
request (the schedule, `lorad rescan`). Folders on network filesystems are polled. The caller's
`ignore(path, signature)` keeps lorad from reacting to its own writes; a scan passes such files by
unread (at start the daemon fills it from the records: a restart re-reads no unchanged file). The
files a scan hands on are counted (`progress`: "ingesting 1,234 of 10,000" in `lorad status`, and
in the log every PROGRESS_EVERY seconds).
In a fleet (`gated`), a folder is watched only while this node holds its lease (lorad.daemon.fleet):
`lead(folder, until)` starts (or keeps) watching it until the monotonic time `until`, and a folder
gained is scanned at once; `unlead(folder)`, or `until` passing without a renewal, stops it at once:
no file of a folder whose lease this node cannot show is taken in, refused or acted on (the check
comes right before each), its observer is removed within a tick, and its candidates are forgotten.
A path deleted or moved away is handed to `on_gone` by the settle thread (never the observer's: it
may hash a mirror file), once it is seen to be still gone; in mirror mode the daemon then removes its
mirror within a tick instead of at the next reconcile.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from lorad._atomic import is_temp_name
from lorad.daemon.config import WatchDir
from lorad.daemon.folder_check import open_lora_refusal
from lorad.errors import LoradError, TransientError
from lorad.library import adapter_folder
from lorad.library.db.session import DatabaseLost
from lorad.library.refusals import FAILED, INCOMPLETE, Refusal, examine, refusal_of
from lorad.log import get_logger
from lorad.pathtext import shown

LORA_SUFFIX = ".safetensors"
PARTIAL_SUFFIXES = (".part", ".crdownload", ".aria2", ".incomplete", ".tmp")
# Filesystems that deliver no inotify events for changes made elsewhere: poll them.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs",
                        "lustre", "gpfs", "beegfs", "sshfs", "davfs", "virtiofs"})  # fmt: skip
RETRY_BASE = 1.0  # seconds before the first retry of a file whose taking-in failed transiently
RETRY_CAP = 60.0
PROGRESS_EVERY = 5.0  # seconds between the log lines of a scan's ingest
# Test hook: seconds each settled file waits before it is taken in, so a test sees an ingest's
# progress on any machine.
INGEST_DELAY_ENV = "LORAD_TEST_INGEST_DELAY"

log = get_logger("lorad.watch")


@dataclass(frozen=True)
class Signature:
    size: int
    mtime_ns: int
    inode: int
    entries: int = 0  # a folder's: a digest of its entries' names, sizes, mtimes and inodes


def signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return _folder_signature(path, st)
    except OSError:
        return None
    return Signature(st.st_size, st.st_mtime_ns, st.st_ino)


def _folder_signature(path: Path, st: os.stat_result) -> Signature:
    h = hashlib.sha256()
    total, latest = 0, st.st_mtime_ns
    for item in sorted(os.scandir(path), key=lambda d: os.fsencode(d.name)):
        est = item.stat(follow_symlinks=False)
        h.update(os.fsencode(item.name) + f"\0{est.st_ino}:{est.st_size}:{est.st_mtime_ns}:{est.st_mode:o}\n".encode())
        total += est.st_size
        latest = max(latest, est.st_mtime_ns)
    return Signature(total, latest, st.st_ino, int(h.hexdigest()[:15], 16))


def is_candidate(path: Path) -> bool:
    """A LoRA file we might take: `*.safetensors`, not hidden (temp names of lorad and others)."""
    return path.name.endswith(LORA_SUFFIX) and not path.name.startswith(".")


def is_adapter_candidate(path: Path) -> bool:
    """A folder that is (or is becoming) a PEFT adapter folder, not hidden."""
    name = path.name
    return (not name.startswith(".") and not name.endswith(LORA_SUFFIX) and os.path.isdir(path)
            and adapter_folder.looks_like_adapter(path))  # fmt: skip


def _peft_file(name: str) -> bool:
    """Either PEFT file, or a download of one in progress (adapter_model.safetensors.part)."""
    return any(name == n or name.startswith(n + ".") for n in adapter_folder.PEFT_NAMES)


def candidate_for(path: Path) -> Path | None:
    """What a hint about `path` is a hint for: the adapter folder a file belongs to (any file in a
    folder with adapter_config.json, or either PEFT file, whichever came first), an adapter folder
    itself, a `.safetensors` file, or nothing."""
    parent = path.parent
    if is_temp_name(path) or is_temp_name(parent):
        return None  # lorad's own folders, being built or retired
    if _peft_file(path.name) or os.path.lexists(parent / adapter_folder.CONFIG):
        return None if parent.name.startswith(".") else parent
    if is_adapter_candidate(path):
        return path
    return path if is_candidate(path) else None


def partial_siblings(path: Path) -> list[Path]:
    """Download-in-progress markers next to `path` (name.part and stem.part styles)."""
    names = {path.name + s for s in PARTIAL_SUFFIXES} | {path.stem + s for s in PARTIAL_SUFFIXES}
    return sorted(path.parent / n for n in names if (path.parent / n).exists())


def fs_type(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The filesystem type of the mount holding `path` (its longest mount-point prefix)."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    path = Path(os.path.realpath(path))
    best, best_type = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(_unescape_mount(fields[1]))
        if (path == mount or mount in path.parents) and len(mount.parts) > best:
            best, best_type = len(mount.parts), fields[2]
    return best_type


def _unescape_mount(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def should_poll(watch: WatchDir, fstype: str | None) -> bool:
    if watch.poll is not None:
        return watch.poll
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse"))


def scan_folder(watch: WatchDir) -> Iterator[Path]:
    """Every candidate under a watched folder (recursively when configured), whatever it is: a
    FIFO or a directory named *.safetensors is yielded too, to be refused with its reason. An
    adapter folder is yielded as one candidate; the files in it are not."""
    if not watch.path.is_dir():
        return
    seen: set[Path] = set()

    def fresh(path: Path | None) -> bool:
        if path is None or path in seen:
            return False
        seen.add(path)
        return True

    if not watch.recursive:
        for p in sorted(watch.path.iterdir()):
            target = candidate_for(p)
            if fresh(target):
                yield target  # type: ignore[misc]
        return
    for root, dirs, files in os.walk(watch.path):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        adapters = [d for d in dirs if is_adapter_candidate(here / d)]
        dirs[:] = [d for d in dirs if d not in adapters]  # its files are the folder's, never LoRAs alone
        for name in sorted(files + [d for d in dirs if d.endswith(LORA_SUFFIX)] + adapters):
            target = candidate_for(here / name)
            if fresh(target):
                yield target  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Settling: hints in, settled paths out. No threads here; the Watcher drives it.


@dataclass
class _Candidate:
    seen: Signature | None
    quiet_since: float  # monotonic time of the last change we noticed
    confirmed: bool  # a close-write / moved-to event, a poll or a scan saw it
    not_before: float = 0.0  # a retry after a transient failure waits until then
    hints: int = 0  # bumped by every hint: a verdict reached meanwhile is stale


@dataclass(frozen=True)
class Refused:
    path: Path
    signature: Signature
    refusal: Refusal


class Settler:
    """Candidates in, settled paths (`due`) and refusals (`take_refused`) out.

    The lock guards the bookkeeping only: files are examined outside it, so a slow or hostile
    file never stalls a hint, `pending()` or `lorad status`.
    """

    def __init__(
        self,
        settle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        examine: Callable[[Path], Refusal | str | None] = examine,
        skip: Callable[[Path, Signature], bool] = lambda _p, _s: False,
    ) -> None:
        """examine: a settled candidate's verdict (None, a Refusal, or "wait"); skip: candidates
        to drop unexamined as they are now (lorad's own writes: an adapter folder's examination
        starts a process)."""
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._examine = examine
        self._skip = skip
        self._candidates: dict[Path, _Candidate] = {}
        self._rejected: dict[Path, Signature] = {}  # refused as last seen
        self._refused: list[Refused] = []
        self._lock = threading.Lock()

    def hint(self, path: Path, confirmed: bool, recheck: bool = False) -> None:
        """An event or scan saw `path` (a hint for the candidate it belongs to: lorad.daemon.watch.
        candidate_for); any hint restarts its quiet period. A candidate refused as it is now is
        left alone, unless `recheck` (a reconcile scan) asks to look at it again."""
        target = candidate_for(path)
        if target is None:
            return
        path = target
        sig = signature(path)
        with self._lock:
            now = self._clock()
            current = self._candidates.get(path)
            if current is None:
                if recheck:
                    self._rejected.pop(path, None)
                elif sig is not None and self._rejected.get(path) == sig:
                    return  # refused as it is now; wait for it to change
                self._candidates[path] = _Candidate(sig, now, confirmed)
                return
            current.seen, current.quiet_since = sig, now
            current.confirmed = current.confirmed or confirmed
            current.hints += 1

    def forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)
            self._rejected.pop(path, None)

    def forget_under(self, root: Path) -> None:
        """Forget every candidate in a folder no longer watched here."""
        with self._lock:
            for table in (self._candidates, self._rejected):
                for path in [p for p in table if _under(p, (root,))]:
                    del table[path]

    def pending(self) -> list[Path]:
        with self._lock:
            return sorted(self._candidates)

    def reject(self, path: Path, sig: Signature, refusal: Refusal) -> None:
        """Refuse a file that was handed on and could not be taken in (left alone until it
        changes or a reconcile scan rechecks it)."""
        with self._lock:
            self._candidates.pop(path, None)
            self._rejected[path] = sig
            self._refused.append(Refused(path, sig, refusal))

    def hurry(self) -> None:
        """Candidates waiting out a retry's backoff are due now (what they waited on is back)."""
        with self._lock:
            for cand in self._candidates.values():
                cand.not_before = 0.0

    def retry_later(self, path: Path, sig: Signature, delay: float) -> None:
        """Hand `path` on again once `delay` seconds have passed (and it is still settled)."""
        with self._lock:
            if path in self._candidates:
                return  # hinted again meanwhile: it settles anew
            now = self._clock()
            self._candidates[path] = _Candidate(sig, now, True, not_before=now + delay)

    def take_refused(self) -> list[Refused]:
        """The refusals since the last call."""
        with self._lock:
            refused, self._refused = self._refused, []
        return refused

    def due(self) -> list[tuple[Path, Signature]]:
        """The candidates that settled since the last call, each with the signature it settled at."""
        ready = self._quiet()
        verdicts = [(path, sig, hints, "skip" if self._skip(path, sig) else self._judge(path, sig))
                    for path, sig, hints in ready]  # fmt: skip
        settled: list[tuple[Path, Signature]] = []
        with self._lock:
            now = self._clock()
            for path, sig, hints, verdict in verdicts:
                cand = self._candidates.get(path)
                if cand is None or cand.hints != hints:
                    continue  # forgotten or hinted again while being judged: judged later
                if verdict == "wait":
                    cand.quiet_since = now
                    continue
                del self._candidates[path]
                if verdict == "skip":
                    continue
                if verdict is None:
                    self._rejected.pop(path, None)
                    settled.append((path, sig))
                elif isinstance(verdict, Refusal):
                    self._rejected[path] = sig
                    self._refused.append(Refused(path, sig, verdict))
        return settled

    def _quiet(self) -> list[tuple[Path, Signature, int]]:
        """Candidates whose quiet period is over (stat only, under the lock)."""
        ready = []
        with self._lock:
            now = self._clock()
            for path, cand in list(self._candidates.items()):
                sig = signature(path)
                if sig is None:
                    del self._candidates[path]  # gone
                    continue
                if sig != cand.seen:
                    cand.seen, cand.quiet_since = sig, now
                    continue
                if self._rejected.get(path) == sig:
                    # Back as it was when refused (an event caught it mid-change, e.g. between a
                    # rewrite and the utime that restored its mtime): left alone, as hint() does.
                    del self._candidates[path]
                    continue
                if cand.confirmed and now - cand.quiet_since >= self.settle_seconds and now >= cand.not_before:
                    ready.append((path, sig, cand.hints))
        return ready

    def _judge(self, path: Path, sig: Signature) -> Refusal | str | None:
        """None: settled; "wait": look again a settle period later; "gone"; or a Refusal."""
        if partial_siblings(path):
            return "wait"
        try:
            refusal: Refusal | str | None = self._examine(path)
        except FileNotFoundError:
            return "gone"
        except TransientError:  # (an adapter folder's look-up in the database): look again later
            return "wait"
        except OSError as e:
            refusal = refusal_of(e, path)
        if signature(path) != sig:
            return "wait"  # it changed while being read: settle again
        return refusal


class Progress:
    """The files scans found that are not taken in yet: `lorad status` shows "ingesting 1,234 of
    10,000", and the log says so every PROGRESS_EVERY seconds rather than once per file."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._left: set[Path] = set()
        self._done = 0
        self._started = self._said = 0.0
        self._lock = threading.Lock()

    def found(self, paths: Sequence[Path]) -> None:
        with self._lock:
            fresh = [p for p in paths if p not in self._left]
            if not fresh:
                return
            if not self._left:
                self._done, self._started = 0, self._clock()
            self._left.update(fresh)
            self._said = self._clock()
            log.info("ingesting files a scan found", found=len(fresh), of=self._done + len(self._left))

    def taken(self, path: Path) -> None:
        """`path` was taken in, or refused: done either way."""
        with self._lock:
            if path not in self._left:
                return
            self._left.discard(path)
            self._done += 1
            if self._clock() - self._said >= PROGRESS_EVERY and self._left:
                self._said = self._clock()
                log.info("ingesting", done=self._done, of=self._done + len(self._left))
            self._end_if_done()

    def keep(self, waiting: Callable[[], Iterable[Path]]) -> None:
        """Forget the paths no longer `waiting` to be taken in (gone, or lorad's own files)."""
        with self._lock:
            if self._left:
                self._left &= set(waiting())
                self._end_if_done()

    def now(self) -> dict[str, int] | None:
        with self._lock:
            return {"done": self._done, "total": self._done + len(self._left)} if self._left else None

    def _end_if_done(self) -> None:
        if not self._left:
            log.info("ingest done", files=self._done, seconds=round(self._clock() - self._started, 1))


# ---------------------------------------------------------------------------------------------
# Observers


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into hints. It must never raise: that kills the observer thread."""

    def __init__(self, watcher: Watcher, polling: bool) -> None:
        self._watcher = watcher
        self._polling = polling  # a poll's created/modified is as good as a close-write

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:  # noqa: BLE001 - an exception here would silently stop watching
            log.exception("watch event handler failed", src_path=shown(os.fsdecode(event.src_path)))

    def _route(self, event: FileSystemEvent) -> None:
        watcher, settler = self._watcher, self._watcher.settler
        if isinstance(event, EventsLostEvent):
            # The kernel's inotify queue overflowed (IN_Q_OVERFLOW): events are gone; scan.
            watcher.request_reconcile("inotify queue overflow")
            return
        src = Path(os.fsdecode(event.src_path))
        if isinstance(event, FileClosedEvent):
            settler.hint(src, confirmed=True)
        elif isinstance(event, FileMovedEvent):
            # Full events: a move in from outside has no source, a move out has no destination.
            if event.src_path:
                watcher.left(src)
            if event.dest_path:
                settler.hint(Path(os.fsdecode(event.dest_path)), confirmed=True)
        elif isinstance(event, FileCreatedEvent):
            # "Created" means writing has started, for a plain file. A symlink, FIFO, socket or
            # device never gets the close-write that would confirm it: it is all there is.
            settler.hint(src, confirmed=self._polling or not _plain_file(src))
        elif isinstance(event, FileModifiedEvent):
            settler.hint(src, confirmed=self._polling)
        elif isinstance(event, FileDeletedEvent):
            watcher.left(src)
        elif isinstance(event, DirDeletedEvent):
            watcher.forget(src)
        elif isinstance(event, (DirCreatedEvent, DirMovedEvent)):
            if isinstance(event, DirMovedEvent) and event.src_path:
                watcher.left(src)  # an adapter folder moved away is gone from where it was
            # Files can land in a new folder before its watch exists (watchdog#990): scan it.
            folder = Path(os.fsdecode(getattr(event, "dest_path", "") or event.src_path))
            # An adapter folder, or one named *.safetensors (refused, said once)...
            settler.hint(folder, confirmed=True)
            watcher.scan_path(folder)


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def examine_candidate(path: Path, roots: Sequence[Path] = (),
                      stored: Callable[[Path], bool] = lambda _p: False) -> Refusal | str | None:  # fmt: skip
    """A settled candidate's verdict: a file's (lorad.library.refusals.examine), or an adapter folder's
    (lorad.library.adapter_folder: the cheap checks, then open_lora in a short-lived process, unless
    `stored` says lorad already holds the folder as it is: every rescan and restart would
    otherwise start one such process per folder)."""
    if is_adapter_candidate(path):
        verdict = adapter_folder.refusal(path, roots)
        if verdict is None and not stored(path):
            verdict = open_lora_refusal(path)
        return verdict
    return examine(path, roots)


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return True  # gone already: nothing to confirm


def _inotify_observer() -> BaseObserver:
    """inotify with full move events, so a move in from outside the folder is a moved-to event
    (the default observer reports it as "created", which we cannot tell from a write starting)."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux: the platform's native observer
        return Observer()
    return InotifyObserver(generate_full_events=True)


class Watcher:
    """Observers (inotify or polling) feeding a Settler, and a thread that hands on settled files."""

    def __init__(
        self,
        dirs: Sequence[WatchDir],
        settle_seconds: float,
        poll_seconds: float,
        on_settled: Callable[[Path, WatchDir, Signature], None],
        ignore: Callable[[Path, Signature], bool] = lambda _p, _s: False,
        stored: Callable[[Path], bool] = lambda _p: False,
        for_path: Callable[[Path], WatchDir | None] | None = None,
        on_refused: Callable[[Path, Refusal], None] = lambda _p, _r: None,
        on_scanned: Callable[[set[Path], Sequence[Path]], None] = lambda _paths, _roots: None,
        on_gone: Callable[[Path], None] = lambda _p: None,
        gated: bool = False,
    ) -> None:
        """on_refused: a file is refused (once per path and cause); on_scanned: a reconcile scan
        of these watched folders found exactly these candidate paths (refusals of any other path
        in them are stale); on_gone: a path was deleted or moved away, and is still gone.
        gated: a folder is watched only while `lead` says so (a fleet's leases); else every one."""
        self.dirs = tuple(dirs)
        self._gated = gated
        self._until: dict[Path, float] = {}  # gated: folder -> monotonic deadline of its lease
        self._lead_lock = threading.Lock()
        self._scheduled: dict[Path, tuple[BaseObserver, ObservedWatch]] = {}  # settle thread only
        roots = tuple(Path(os.path.realpath(w.path)) for w in self.dirs)
        self.settler = Settler(settle_seconds, examine=lambda p: examine_candidate(p, roots, stored),
                               skip=lambda p, s: ignore(p, s))  # fmt: skip
        self.poll_seconds = poll_seconds
        self._on_settled = on_settled
        self._on_refused = on_refused
        self._on_scanned = on_scanned
        self._on_gone = on_gone
        self._gone: set[Path] = set()  # paths deleted or moved away, for the settle thread
        self._gone_lock = threading.Lock()
        self._ignore = ignore
        self._for_path = for_path or self._deepest_dir
        # What was last said about each path (a refusal's or a retry's cause): said once, not
        # at every scan or retry. Only the settle thread touches these two.
        self._said: dict[Path, tuple[str, str]] = {}
        self._retries: dict[Path, int] = {}
        self._refused_now: dict[Path, Refusal] = {}  # status: what is refused at the moment
        self._refused_lock = threading.Lock()
        self._observers: list[BaseObserver] = []
        self._stop = threading.Event()
        self._reconcile = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconciles = 0  # completed reconcile scans (status, tests)
        self.restarts = 0  # observers restarted after dying
        self.progress = Progress()
        self._delay = float(os.environ.get(INGEST_DELAY_ENV) or 0)

    # life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._start_observers()
        self.request_reconcile("start")
        self._thread = threading.Thread(target=self._run, name="lorad-settle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._stop_observers()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive()) and all(o.is_alive() for o in self._observers)

    def observers_alive(self) -> bool:
        return all(o.is_alive() for o in self._observers)

    # leadership (a fleet's folder leases) --------------------------------------------------

    def lead(self, folder: Path, until: float) -> None:
        """This node holds `folder`'s lease until the monotonic time `until`: watch it (a folder
        newly gained is scanned at once)."""
        with self._lead_lock:
            self._until[folder] = until

    def unlead(self, folder: Path) -> None:
        """This node no longer holds `folder`'s lease: nothing in it is acted on from now on."""
        with self._lead_lock:
            self._until.pop(folder, None)

    def leads(self, folder: Path) -> bool:
        if not self._gated:
            return True
        with self._lead_lock:
            return self._until.get(folder, 0.0) > time.monotonic()

    def leading(self) -> dict[Path, bool]:
        """Each watched folder and whether this node watches it now."""
        return {w.path: self.leads(w.path) for w in self.dirs}

    def _leads_path(self, path: Path) -> bool:
        watch = self._for_path(path)
        return watch is not None and self.leads(watch.path)

    def retry_now(self) -> None:
        """The files whose taking-in failed for a passing reason are tried again at the next tick
        (the database answers again)."""
        self.settler.hurry()

    def request_reconcile(self, reason: str) -> None:
        log.info("reconcile scan requested", reason=reason)
        self._reconcile.set()

    def left(self, path: Path) -> None:
        """A file was deleted or moved away: if it was part of an adapter folder, the folder
        changed; else the file is gone."""
        target = candidate_for(path)
        if target is not None and target != path:
            self.settler.hint(target, confirmed=True)  # nothing else will confirm a removal
        else:
            self.forget(path)

    def forget(self, path: Path) -> None:
        """The path was deleted or moved away."""
        self.settler.forget(path)
        with self._refused_lock:
            self._refused_now.pop(path, None)
        if not (is_temp_name(path) or is_temp_name(path.parent)):  # lorad's own temp files come and go
            with self._gone_lock:
                self._gone.add(path)

    def refused(self) -> dict[Path, Refusal]:
        """The paths refused at the moment, with why."""
        with self._refused_lock:
            return dict(self._refused_now)

    # scanning ----------------------------------------------------------------------------

    def scan(self, only: Iterable[Path] | None = None) -> int:
        """Reconcile: hint every candidate file in every watched folder this node watches (or in
        `only` of them), refused ones included (each is examined afresh); return how many."""
        found: set[Path] = set()
        hinted: list[Path] = []
        wanted = None if only is None else set(only)
        scanned = [w for w in self.dirs if self.leads(w.path) and (wanted is None or w.path in wanted)]
        roots = [w.path for w in scanned]
        for watch in scanned:
            for path in scan_folder(watch):
                found.add(path)
                sig = signature(path)
                if sig is not None and self._ignore(path, sig):
                    continue  # as lorad last left it (a restart knows these from the records)
                self.settler.hint(path, confirmed=True, recheck=True)
                hinted.append(path)
        self.progress.found(hinted)
        with self._refused_lock:
            for path in set(self._refused_now) - found:
                if _under(path, roots):
                    del self._refused_now[path]
        for path in set(self._said) - found:
            if _under(path, roots):
                self._said.pop(path, None)
                self._retries.pop(path, None)
        try:
            if scanned:
                self._on_scanned(found, roots)
        except Exception as e:  # noqa: BLE001 - bookkeeping; the scan itself is done
            log.warning("could not forget the refusals of files gone since", error=shown(str(e)))
        self.reconciles += 1
        log.info("reconcile scan done", files=len(found))
        return len(found)

    def scan_path(self, folder: Path) -> None:
        watch = self._for_path(folder / "x.safetensors")
        if watch is None:
            return
        for root, _dirs, files in os.walk(folder):
            for name in files:
                self.settler.hint(Path(root) / name, confirmed=True)

    # internals ---------------------------------------------------------------------------

    def _deepest_dir(self, path: Path) -> WatchDir | None:
        best = None
        for w in self.dirs:
            if (w.path == path or w.path in path.parents) and (w.recursive or path.parent == w.path):
                if best is None or len(w.path.parts) > len(best.path.parts):
                    best = w
        return best

    def _start_observers(self) -> None:
        inotify: BaseObserver = _inotify_observer()
        polling: BaseObserver = PollingObserver(timeout=self.poll_seconds)
        self._observers = [inotify, polling]
        self._scheduled = {}
        for o in self._observers:
            o.daemon = True
            o.start()
        self._sync_folders(scan_gained=False)

    def _schedule(self, watch: WatchDir) -> None:
        try:
            watch.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("cannot create watched folder", path=str(watch.path), error=str(e))
            return
        poll = should_poll(watch, fs_type(watch.path))
        observer = self._observers[1 if poll else 0]
        observed = observer.schedule(_Handler(self, polling=poll), str(watch.path), recursive=watch.recursive)
        self._scheduled[watch.path] = (observer, observed)
        log.info("watching", path=str(watch.path), recursive=watch.recursive, poll=poll, policy=watch.policy)

    def _sync_folders(self, scan_gained: bool = True) -> None:
        """Observe the folders this node leads now, and only those; scan the ones gained."""
        gained = []
        for watch in self.dirs:
            leads = self.leads(watch.path)
            if leads and watch.path not in self._scheduled:
                self._schedule(watch)
                gained.append(watch.path)
            elif not leads and watch.path in self._scheduled:
                observer, observed = self._scheduled.pop(watch.path)
                try:
                    observer.unschedule(observed)
                except Exception as e:  # noqa: BLE001 - gone already with a dead observer
                    log.warning("could not stop observing a folder", path=str(watch.path), error=str(e))
                self.settler.forget_under(watch.path)
                with self._refused_lock:
                    for path in [p for p in self._refused_now if _under(p, (watch.path,))]:
                        del self._refused_now[path]
                log.info("stopped watching: this node does not hold the folder's lease", path=str(watch.path))
        if gained and scan_gained:
            self.scan(only=gained)

    def _stop_observers(self) -> None:
        for o in self._observers:
            o.stop()
        for o in self._observers:
            if o.is_alive():
                o.join(timeout=5)
        self._observers = []
        self._scheduled = {}

    def _run(self) -> None:
        tick = max(0.05, min(0.5, self.settler.settle_seconds / 3))
        while not self._stop.wait(tick):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep the watcher alive whatever one file does
                log.exception("watcher tick failed")

    def _tick(self) -> None:
        if not self.observers_alive() and not self._stop.is_set():
            log.warning("an observer thread died; restarting it and reconciling")
            self._stop_observers()
            self._start_observers()
            self.restarts += 1
            self._reconcile.set()
        if self._reconcile.is_set():
            self._reconcile.clear()
            self._sync_folders(scan_gained=False)
            self.scan()
        else:
            self._sync_folders()
        self._hand_on_gone()
        for path, sig in self.settler.due():
            if self._hand_on(path, sig):
                self.progress.taken(path)
        for refused in self.settler.take_refused():
            self._refuse(refused.path, refused.refusal)
            self.progress.taken(refused.path)
        self.progress.keep(self.settler.pending)

    def _hand_on_gone(self) -> None:
        with self._gone_lock:
            gone, self._gone = self._gone, set()
        for path in sorted(gone):
            if os.path.lexists(path) or not self._leads_path(path):
                continue  # back already (replaced by a rename, or swapped), or another node's
            try:
                self._on_gone(path)
            except DatabaseLost:
                pass  # said once by the database's health; the next reconcile scan does the same
            except Exception as e:  # noqa: BLE001 - the next reconcile scan does the same
                log.warning("could not act on a deleted file", path=shown(path), error=shown(str(e)))

    def _hand_on(self, path: Path, sig: Signature) -> bool:
        """Whether lorad is done with `path` as it is (taken in, refused, or none of its
        business); False: it is tried again later."""
        watch = self._for_path(path)
        if watch is None or self._ignore(path, sig):
            return True
        if self._delay:
            time.sleep(self._delay)
        if not self.leads(watch.path):
            return True  # its lease is another node's now (which scans the folder when it gains it)
        try:
            self._on_settled(path, watch, sig)
        except TransientError as e:
            self._retry(path, sig, e)
            return False
        except LoradError as e:
            if os.path.lexists(path):  # (gone meanwhile: nothing to refuse)
                self.settler.reject(path, sig, refusal_of(e, path))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            refusal = Refusal(FAILED, f"{type(e).__name__}: {shown(str(e))}")
            if self._said.get(path) != (refusal.cause, refusal.reason):
                log.exception("handling a settled file failed", path=shown(path))
            self.settler.reject(path, sig, refusal)
        else:
            self._retries.pop(path, None)
            self._said.pop(path, None)
            with self._refused_lock:
                self._refused_now.pop(path, None)
        return True

    def _retry(self, path: Path, sig: Signature, error: TransientError) -> None:
        attempt = self._retries.get(path, 0) + 1
        self._retries[path] = attempt
        delay = min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1))
        self.settler.retry_later(path, sig, delay)
        said = ("transient", shown(str(error)))
        if isinstance(error, DatabaseLost):
            return  # said once for every file, by the database's health
        if self._said.get(path) != said:
            self._said[path] = said
            log.warning("cannot take the file in for now; trying again with backoff", path=shown(path),
                        error=said[1], retry_in_s=delay)  # fmt: skip

    def _refuse(self, path: Path, refusal: Refusal) -> None:
        if not self._leads_path(path):
            return  # the folder's new watcher looks at it again
        with self._refused_lock:
            self._refused_now[path] = refusal
        said = (refusal.cause, refusal.reason)
        if self._said.get(path) == said:
            return  # said already, and recorded
        self._said[path] = said
        self._retries.pop(path, None)
        level = log.info if refusal.cause == INCOMPLETE else log.warning
        level("refused", path=shown(path), cause=refusal.cause, reason=refusal.reason)
        try:
            self._on_refused(path, refusal)
        except Exception as e:  # noqa: BLE001 - the refusal stands; only its record is missing
            log.warning("could not record a refusal", path=shown(path), error=shown(str(e)))
