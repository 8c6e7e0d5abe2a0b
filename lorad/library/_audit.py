"""The audit trail's record of a refused or failed library operation (a "failed" event)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from lorad.errors import LoradError
from lorad.library._refs import Refs
from lorad.library.db import repo
from lorad.library.db.session import Database, DatabaseUnavailable
from lorad.pathtext import shown

log = structlog.get_logger()


@contextmanager
def failure_recorded(db: Database, refs: Refs, op: str, actor: str, subject: object) -> Iterator[None]:
    """Record a refused or failed operation in the audit trail, then let the error through."""
    try:
        yield
    except DatabaseUnavailable:
        raise  # recording it would wait on the same lock, and fail the same way
    except LoradError as e:
        _record_failure(db, refs, op, actor, subject, e)
        raise


def _record_failure(db: Database, refs: Refs, op: str, actor: str, subject: object, error: Exception) -> None:
    try:
        with db.write() as s:
            lora_id = None
            if isinstance(subject, (int, str, os.PathLike)):
                with contextlib.suppress(LoradError):
                    lora_id = refs.find_lora(s, subject).id
            repo.record_event(s, "failed", actor, lora_id, op=op, subject=str(subject), error=str(error))
    except Exception as e:  # the audit trail must not hide the error being reported
        log.warning("could not record a failure", op=op, error=shown(str(e)))
