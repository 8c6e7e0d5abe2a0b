"""The store's identity: one id, in the database and in the store's root, checked at every start.

A fleet's nodes share one database and one store on a shared filesystem (`store_dir`). A node whose
mount failed sees an empty folder at the mount point, and would fill it with blobs that no other
node can see, while the records say they exist. So the store gets an id (a uuid4) at the fleet's
first start, kept in the database (the `store_identity` row) and in `<store_dir>/lorad-store-id`,
and a start where the two disagree is refused before anything is written into store_dir:

  database   file        what happens
  no id      none        first start: a new id (adopted, when the store already holds blobs: a
                         single-node install upgrading), written to the database, then the file
  no id      an id       refused: this store belongs to another database (a new, empty database
                         over a fleet's store would count its blobs as strays)
  an id      none        refused (is the share mounted?), unless the database says the file was
                         never written yet (a first start cut short): then it is written now
  an id      same id     started
  an id      other id    refused: store_dir and database belong to different stores

The database decides the id: the row is created in a transaction (one row, id = 1), so two nodes
starting at once agree on one id; the file is written after the row (temp file in the store's root,
fsync, rename) and the row is marked confirmed after the file, so a crash between the two is put
right by the next start.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from lorad._atomic import TEMP_SUFFIX, fsync_dir
from lorad.errors import StoreError
from lorad.library.db.models import StoreIdentity, utcnow
from lorad.library.db.session import Database

log = structlog.get_logger()

ID_FILE = "lorad-store-id"
ROW_ID = 1
_ATTEMPTS = 5

Action = Literal["created", "adopted", "written", "checked"]


class StoreIdentityError(StoreError):
    """store_dir and the database do not describe the same store: nothing may start on them."""


@dataclass(frozen=True)
class Identity:
    store_id: str
    action: Action  # created (new store), adopted (a store with blobs), written (file written now), checked


@dataclass(frozen=True)
class _Row:
    store_id: str
    confirmed: bool


def id_file(root: Path) -> Path:
    return Path(root) / ID_FILE


def read_file(root: Path) -> str | None:
    """The id in `<root>/lorad-store-id`; None when there is no such file (or no root)."""
    path = id_file(root)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StoreIdentityError(f"store_dir {root}: cannot read {path}: {why}") from e
    try:
        if str(uuid.UUID(text)) == text:
            return text
    except ValueError:
        pass
    raise StoreIdentityError(f"store_dir {root}: {path} holds no store id ({text[:40]!r}); "
                             "it is lorad's: restore it from another node's store_dir, or remove it "
                             "if this store is new")  # fmt: skip


def write_file(root: Path, store_id: str) -> None:
    """Write the id file: a temp file of this process's own in the store's root, fsynced, renamed
    over the name (two nodes writing at once each rename whole, identical files)."""
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{ID_FILE}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(f"{store_id}\n".encode("ascii"))
            f.flush()
            os.fchmod(f.fileno(), 0o444)  # every node's user may read it; nobody edits it
            os.fsync(f.fileno())
        os.replace(tmp, id_file(root))
        fsync_dir(root)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _row(db: Database) -> _Row | None:
    with db.read() as s:
        row = s.get(StoreIdentity, ROW_ID)
        return None if row is None else _Row(row.store_id, row.confirmed_at is not None)


def _has_blobs(root: Path) -> bool:
    objects = Path(root) / "objects" / "sha256"
    try:
        shards = list(os.scandir(objects))
    except (FileNotFoundError, NotADirectoryError):
        return False
    for shard in shards:
        if shard.is_dir(follow_symlinks=False):
            with os.scandir(shard.path) as blobs:
                if any(b.name[:2] == shard.name and len(b.name) == 64 for b in blobs):
                    return True
    return False


def _confirm(db: Database) -> None:
    with db.write() as s:
        s.execute(update(StoreIdentity).where(StoreIdentity.id == ROW_ID, StoreIdentity.confirmed_at.is_(None))
                  .values(confirmed_at=utcnow()))  # fmt: skip


def _missing(root: Path, store_id: str) -> StoreIdentityError:
    what = f"has no {ID_FILE} file" if Path(root).is_dir() else "does not exist"
    return StoreIdentityError(
        f"store_dir {root} {what}, but the database's store id is {store_id}: is the share mounted? "
        f"Is store_dir the path of the fleet's store? lorad will not start on a store the other nodes "
        f"cannot see (nothing was written there)"
    )


def _mismatch(root: Path, file_id: str, store_id: str) -> StoreIdentityError:
    return StoreIdentityError(
        f"store_dir {root} holds store {file_id} ({ID_FILE}), but the database's store id is {store_id}: "
        f"store_dir and database belong to different stores; check which share is mounted at {root} "
        f"and that `database` is the fleet's"
    )


def _foreign(root: Path, file_id: str) -> StoreIdentityError:
    return StoreIdentityError(
        f"store_dir {root} holds store {file_id} ({ID_FILE}), but the database has no store id: is "
        f"`database` the fleet's database? (a new database over an existing store would take its "
        f"blobs for strays)"
    )


def claim(db: Database, root: Path, node: str | None = None) -> Identity:
    """Check (and at the first start, create) the store's identity; StoreIdentityError when the
    database and store_dir disagree. Nothing is written into `root` unless they agree or the store
    is new."""
    root = Path(root)
    for _ in range(_ATTEMPTS):
        row = _row(db)
        file_id = read_file(root)
        if row is None:
            if file_id is not None:
                raise _foreign(root, file_id)
            adopted = _has_blobs(root)
            store_id = str(uuid.uuid4())
            try:
                with db.write() as s:
                    if s.get(StoreIdentity, ROW_ID) is not None:
                        continue  # another node was first: check against its id
                    s.add(StoreIdentity(id=ROW_ID, store_id=store_id, created_by=node, adopted=adopted))
            except IntegrityError:
                continue  # another node inserted at the same instant (PostgreSQL): look again
            root.mkdir(parents=True, exist_ok=True)
            write_file(root, store_id)
            _confirm(db)
            action: Action = "adopted" if adopted else "created"
            log.info(f"store id {action}", store_id=store_id, store_dir=str(root))
            return Identity(store_id, action)
        if file_id is None:
            if row.confirmed:
                raise _missing(root, row.store_id)
            # The row was made but the file never confirmed written (a first start cut short).
            root.mkdir(parents=True, exist_ok=True)
            write_file(root, row.store_id)
            _confirm(db)
            log.info("store id written", store_id=row.store_id, store_dir=str(root))
            return Identity(row.store_id, "written")
        if file_id != row.store_id:
            raise _mismatch(root, file_id, row.store_id)
        if not row.confirmed:
            _confirm(db)
        return Identity(row.store_id, "checked")
    raise StoreIdentityError(f"store_dir {root}: the store's identity kept changing under this start; try again")


def problem(db: Database, root: Path) -> str | None:
    """What is wrong with the store's identity now (for `verify`), or None. Reads only: a database
    with no id yet (a library used without the daemon) has nothing to check."""
    row = _row(db)
    if row is None:
        return None
    try:
        file_id = read_file(root)
    except StoreIdentityError as e:
        return str(e)
    if file_id is None:
        if not row.confirmed:
            return None
        return (f"store_dir {root} has no {ID_FILE} file any more (the database's store id is {row.store_id}): "
                "is the share still mounted?")  # fmt: skip
    if file_id != row.store_id:
        return str(_mismatch(root, file_id, row.store_id))
    return None


def store_id(db: Database) -> str | None:
    row = _row(db)
    return None if row is None else row.store_id
