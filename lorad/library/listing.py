"""`lorad list` over a library of thousands: its pages, filtered and sorted by the database.

A page is one query that filters, sorts and cuts the LoRAs after a cursor (the sort key of the
last one a client has), so each page costs about its own size, whatever the library's, and no
file is read. A cursor names a place in the order, not a position: a client that follows `next`
gets every LoRA exactly once even while LoRAs are added between its pages (those added before the
place it has reached are the ones it does not see).

Paths lorad refused and holds no LoRA for (few, and not in the loras table) come after the LoRAs
in every order, by path; the caller gives them, with the policy of the folder each lies in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Text, and_, case, func, or_, select, type_coerce
from sqlalchemy.orm import Session, aliased

from lorad.library.db.models import Blob, Lora, Refusal, Variant
from lorad.library.records import blob_ranks, latest_effects
from lorad.pathtext import escaped_column, to_column

STATES = ("original", "reduced", "refused")
SORTS = ("name", "saved", "size", "date")


@dataclass(frozen=True)
class Brief:
    """What `lorad list`'s table shows of a LoRA, read in its page's own query (no variant views):
    a page of thousands costs about a third of their full views."""

    kind: str  # "file" or "folder"
    original_bytes: int | None
    active_bytes: int | None
    active_id: int | None
    active_kind: str | None
    active_method: str | None
    active_param: float | None
    active_ranks: tuple[int, ...] | None  # as recorded for the active blob (None: not recorded)
    variants: int
    refusal: tuple[str, str, datetime, datetime] | None  # (cause, reason, first seen, last seen)
    effect: tuple[float, float] | None = None  # the active variant's latest (effect_retained, its min)


@dataclass(frozen=True)
class Entry:
    """One listed thing: a LoRA (id) or a path lorad refused and holds no LoRA for (id None)."""

    path: str
    id: int | None
    state: str  # "refused" (its file cannot be taken as it is), else what its path holds
    brief: Brief | None = None  # with page(brief=True), for a LoRA


@dataclass(frozen=True)
class Refused:
    """A path lorad refused and holds no LoRA for, as the caller knows it."""

    path: str
    policy: str | None  # the policy of the folder it lies in


@dataclass(frozen=True)
class Page:
    entries: tuple[Entry, ...]
    total: int | None  # entries that pass the filters (on the first page; None after)
    next: str | None  # the cursor of the next page; None: this was the last


@dataclass(frozen=True)
class Totals:
    loras: int
    original_bytes: int  # of every LoRA's original
    active_bytes: int  # of what their paths hold now (LoRAs with an original)

    @property
    def saved_bytes(self) -> int:
        return self.original_bytes - self.active_bytes


class BadCursor(ValueError):
    """A cursor this listing did not hand out (or one of another sort order)."""


@dataclass(frozen=True)
class _Joined:
    """Every LoRA joined to its active and original variants' blobs and to a refusal of its path."""

    query: Any
    active_kind: Any
    original_bytes: Any
    active_bytes: Any
    refusal: Any
    brief: tuple[Any, ...]  # the columns of a Brief, in its order


def _join() -> _Joined:
    active, original = aliased(Variant), aliased(Variant)
    active_blob, original_blob = aliased(Blob), aliased(Blob)
    query = (select(Lora.id).outerjoin(active, active.id == Lora.active_variant_id)
             .outerjoin(active_blob, active_blob.sha256 == active.blob_sha256)
             .outerjoin(original, original.id == Lora.original_variant_id)
             .outerjoin(original_blob, original_blob.sha256 == original.blob_sha256)
             .outerjoin(Refusal, Refusal.path == Lora.path))  # fmt: skip
    variants = select(func.count(Variant.id)).where(Variant.lora_id == Lora.id).scalar_subquery()
    # ranks as text, as records reads them: a library has few distinct ones, each parsed once
    brief = (Lora.kind, original_blob.bytes, active_blob.bytes, active.id, active.kind, active.method, active.param,
             type_coerce(active_blob.ranks, Text), variants, Refusal.cause, Refusal.reason, Refusal.first_seen,
             Refusal.last_seen)  # fmt: skip
    return _Joined(query, active.kind, original_blob.bytes, active_blob.bytes, Refusal.id, brief)


_JOINED = _join()  # built once: its aliases cost more to make than a page costs to read


def totals(s: Session) -> Totals:
    j = _JOINED
    sums = (func.count(Lora.id), func.sum(j.original_bytes),
            func.sum(case((j.original_bytes.is_not(None), j.active_bytes))))  # fmt: skip
    count, original, active = s.connection().execute(j.query.with_only_columns(*sums)).one()
    # int(): PostgreSQL sums a BIGINT column as NUMERIC (a Decimal), which JSON would carry as a string.
    return Totals(int(count or 0), int(original or 0), int(active or 0))


def page(s: Session, refused: Sequence[Refused] = (), *, folder: str | None = None, policy: str | None = None,
         state: str | None = None, sort: str = "name", after: str | None = None, limit: int = 1000,
         brief: bool = False) -> Page:  # fmt: skip
    """The LoRAs (then the `refused` paths) under `folder` (a path itself, or one inside it), of
    `policy` and in `state`, in `sort` order: name by path; saved and size most first; date newest
    taken in first (LoRAs without the figure last); from just after the cursor `after`, at most
    `limit` of them; `brief`: each LoRA with its Brief. Raises ValueError (BadCursor) for a sort,
    state or cursor it does not know."""
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r} (one of {', '.join(SORTS)})")
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r} (one of {', '.join(STATES)})")
    phase, place = _cursor(after, sort)
    j = _JOINED
    state_of = case((j.refusal.is_not(None), "refused"), (j.active_kind == "reduced", "reduced"), else_="original")
    chosen = j.query.add_columns(Lora.path, state_of)
    if folder is not None:
        chosen = chosen.where(_under(folder))
    if policy is not None:
        chosen = chosen.where(Lora.policy == policy)
    if state is not None:
        chosen = chosen.where(state_of == state)
    # Counted on the first page only: the count costs as much as a page sorted by size.
    total = None
    if after is None:
        total = s.connection().scalar(chosen.with_only_columns(func.count()).order_by(None)) or 0
    entries: list[Entry] = []
    more_loras, last_key = False, None
    if phase == "loras":
        keys = _keys(sort, j)
        query = chosen.add_columns(*(k for k, _ in keys)).order_by(*(k.desc() if down else k for k, down in keys))
        if place is not None:
            query = query.where(_after(keys, place))
        if brief:
            query = query.add_columns(*j.brief)
        found = s.connection().execute(query.limit(limit + 1)).all()  # Core rows: twice as fast as the ORM's
        more_loras = len(found) > limit
        end = 3 + len(keys)
        entries = [Entry(row[1], row[0], row[2], _brief(row[end:]) if brief else None) for row in found[:limit]]
        last_key = list(found[len(entries) - 1][3:end]) if entries else None
        if brief:
            entries = _with_effects(s, entries)
    paths = _refused_paths(refused, folder, policy, state)
    total = None if total is None else total + len(paths)
    if phase == "refused":
        paths = [p for p in paths if p > place[0]]  # type: ignore[index]
    room = 0 if more_loras else limit - len(entries)
    entries += [Entry(p, None, "refused") for p in paths[:room]]
    if not (more_loras or len(paths) > room):
        return Page(tuple(entries), total, None)
    if entries[-1].id is None:
        return Page(tuple(entries), total, json.dumps([sort, "refused", entries[-1].path]))
    return Page(tuple(entries), total, json.dumps([sort, "loras", *(_plain(v) for v in last_key or [])]))


def _with_effects(s: Session, entries: list[Entry]) -> list[Entry]:
    measured = latest_effects(s.connection(), [e.brief.active_id for e in entries if e.brief and e.brief.active_id])
    if not measured:
        return entries
    return [e if not e.brief or e.brief.active_id not in measured else
            replace(e, brief=replace(e.brief, effect=(measured[e.brief.active_id].effect_retained,
                                                      measured[e.brief.active_id].effect_retained_min)))
            for e in entries]  # fmt: skip


def _brief(columns: Sequence[Any]) -> Brief:
    *head, ranks, variants, cause, reason, first_seen, last_seen = columns
    refusal = (cause, reason, first_seen, last_seen) if first_seen is not None else None
    return Brief(*head, active_ranks=blob_ranks(ranks), variants=variants, refusal=refusal)


def _refused_paths(refused: Sequence[Refused], folder: str | None, policy: str | None, state: str | None) -> list[str]:
    if state not in (None, "refused"):
        return []
    return sorted(r.path for r in refused if (folder is None or r.path == folder or r.path.startswith(_inside(folder)))
                  and (policy is None or r.policy == policy))  # fmt: skip


def _keys(sort: str, j: _Joined) -> list[tuple[Any, bool]]:
    """(expression, descending) per sort key, ending in the path (unique): every LoRA has its own
    place in the order. A figure a LoRA lacks sorts last (its flag first), never as NULL."""
    if sort == "name":
        return [(Lora.path, False)]
    if sort == "date":
        return [(Lora.created_at, True), (Lora.path, False)]
    figure = j.active_bytes if sort == "size" else j.original_bytes - j.active_bytes
    return [(case((figure.is_(None), 1), else_=0), False), (func.coalesce(figure, 0), True), (Lora.path, False)]


def _after(keys: list[tuple[Any, bool]], place: Sequence[Any]) -> Any:
    """Rows that sort after `place` (one value per key): k0 beyond, or k0 equal and k1 beyond..."""
    condition = None
    for (key, down), value in reversed(list(zip(keys, place, strict=True))):
        beyond = key < value if down else key > value
        condition = beyond if condition is None else or_(beyond, and_(key == value, condition))
    return condition


def _under(folder: str) -> Any:
    """A LoRA's path is `folder` or lies inside it, in whichever form it is stored (lorad.pathtext:
    a path that is not UTF-8 is stored escaped, behind a prefix)."""
    stored = type_coerce(Lora.path, Text)
    inside = _inside(folder)
    forms = {to_column(inside), escaped_column(inside)}
    return or_(Lora.path == folder, *(stored.startswith(f, autoescape=True) for f in forms))


def _inside(folder: str) -> str:
    return folder.rstrip("/") + "/"


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


_CURSOR_TYPES = {"name": (str,), "saved": (int, int, str), "size": (int, int, str), "date": (str, str)}


def _cursor(cursor: str | None, sort: str) -> tuple[str, list[Any] | None]:
    """(phase, the sort key it names): "loras" (None: from the start) or "refused"."""
    if cursor is None:
        return "loras", None
    try:
        doc = json.loads(cursor)
    except ValueError:
        raise BadCursor("the cursor is not one lorad handed out") from None
    if not isinstance(doc, list) or len(doc) < 3 or doc[0] != sort:
        raise BadCursor(f"the cursor is not one of a listing sorted by {sort}")
    phase, key = doc[1], doc[2:]
    want = _CURSOR_TYPES[sort] if phase == "loras" else (str,) if phase == "refused" else None
    if want is None or tuple(type(x) for x in key) != want:
        raise BadCursor("the cursor is not one lorad handed out")
    if phase == "loras" and sort == "date":
        try:
            key[0] = datetime.fromisoformat(key[0])
        except ValueError:
            raise BadCursor("the cursor is not one lorad handed out") from None
    return phase, key
