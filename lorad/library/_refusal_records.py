"""The recorded refusals of watched paths, read and pruned (recording and clearing one is
lorad.library.core's: reconcile and the folder helpers do it too)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from lorad.library.db import repo
from lorad.library.db.session import Database
from lorad.library.records import RefusalView, refusal_view


class RefusalRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    def refusals(self) -> list[RefusalView]:
        with self.db.read() as s:
            rows = [refusal_view(s, r) for r in repo.all_refusals(s)]
        return [r for r in rows if os.path.lexists(r.path)]

    def refusal_counts(self) -> dict[str, int]:
        with self.db.read() as s:
            return repo.refusal_counts(s)

    def refusal(self, path: str | os.PathLike[str]) -> RefusalView | None:
        with self.db.read() as s:
            row = repo.refusal_at(s, os.path.abspath(path))
            return refusal_view(s, row) if row is not None else None

    def prune(self, present: Iterable[str | os.PathLike[str]], roots: Iterable[str | os.PathLike[str]] | None) -> None:
        keep = {os.path.abspath(p) for p in present}
        within = None if roots is None else tuple(os.path.abspath(r).rstrip("/") + "/" for r in roots)
        with self.db.read() as s:
            stale = [r.path for r in repo.all_refusals(s)
                     if r.path not in keep and (within is None or r.path.startswith(within))]  # fmt: skip
        if stale:
            with self.db.write() as s:
                repo.prune_refusals(s, keep, None if within is None else [w.rstrip("/") for w in within])
