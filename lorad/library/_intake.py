"""Taking files in: a watched file (or adapter folder) stored as an original, a reduction's output
stored as a variant, and the hashes sidecars beside a LoRA claim. Bytes reach the store before any
record names them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog
from sqlalchemy.exc import SQLAlchemyError

from lorad._fileio import check_regular
from lorad.engine.report import Report
from lorad.errors import LoradError, StoreError
from lorad.library import folders
from lorad.library._audit import failure_recorded
from lorad.library._refs import LoraRef, Refs
from lorad.library.core import Core
from lorad.library.db import repo
from lorad.library.reconcile import reconcile
from lorad.library.records import LoraView, VariantView, variant_view
from lorad.library.states import unchanged_token
from lorad.library.store import FileStamp, _crashpoint
from lorad.pathtext import shown

log = structlog.get_logger()


class Intake:
    def __init__(self, core: Core, refs: Refs, view: Callable[[int], LoraView]) -> None:
        """view: the LoRA's view, as an ingest returns it."""
        self.core, self.refs, self.view = core, refs, view

    def ingest(self, path: str | os.PathLike[str], policy: str | None, actor: str) -> LoraView:
        core = self.core
        with core.lock, failure_recorded(core.db, self.refs, "ingest", actor, path):
            target, root = self.refs.watched(path)
            is_folder = target.is_dir() and not target.name.endswith(".safetensors")
            try:
                if not is_folder:
                    check_regular(target)  # a FIFO, device or directory: refused by its mode, unopened
            except FileNotFoundError:
                raise StoreError(f"{target}: no such file") from None
            with core.db.read() as s:
                lora = repo.lora_by_path(s, str(target))
                lora_id = lora.id if lora else None
            if lora_id is not None:
                state = reconcile(core, lora_id, actor, trust_stamp=True)  # forgets a refusal of `target`
                if state.refusal is None and os.path.abspath(path) != str(target):
                    core.clear_refusal(path)  # and of the symlink it was found under
                self._refresh_claims_quietly(lora_id)  # a manager may have written a sidecar since
                return self.view(lora_id)
            if is_folder:
                lora_id = folders.ingest(core, target, root, os.path.abspath(path), policy, actor)
                if root in core.mirrors:
                    reconcile(core, lora_id, actor, trust_stamp=True)  # the original, mirrored
                return self.view(lora_id)
            stamp = FileStamp.of_path(target)
            info, record = core.store_file(target)
            _crashpoint("ingest:after-store")
            with core.db.write() as s:
                lora = repo.lora_by_path(s, str(target)) or repo.add_lora(s, str(target), str(root), policy)
                core.record_blobs(s, [record], restore=lambda: core.store_file(target, expect_sha256=info.sha256))
                variant = repo.original_with_blob(s, lora, info.sha256)
                repo.set_original(s, lora, variant)
                repo.set_active(s, lora, variant)
                lora.file_stamp = unchanged_token(target, stamp)
                repo.record_event(s, "ingested", actor, lora.id, variant.id, sha256=info.sha256,
                                  bytes=info.bytes, path=str(target))  # fmt: skip
                repo.clear_refusal(s, os.path.abspath(path))
                repo.clear_refusal(s, str(target))
                lora_id = lora.id
            _crashpoint("ingest:after-commit")
            log.info("ingested", path=shown(target), sha256=info.sha256)
            if root in core.mirrors:
                reconcile(core, lora_id, actor, trust_stamp=True)  # the original, mirrored
            self._refresh_claims_quietly(lora_id)
            return self.view(lora_id)

    def add_variant(self, lora: LoraRef, report: Report, actor: str, source: str | None) -> VariantView:
        core = self.core
        with core.lock, failure_recorded(core.db, self.refs, "add_variant", actor, lora):
            if report.output is None:
                raise StoreError("the report describes no output file (a plan?); nothing to add")
            out = Path(report.output.path)
            with core.db.read() as s:
                row = self.refs.find_lora(s, lora)
                lora_id, kind = row.id, row.kind
            if kind == "folder":
                return folders.add_variant(core, lora_id, report, source, actor)
            with core.db.read() as s:
                source_row = repo.variant_with_blob(s, lora_id, report.input.sha256)
                if source_row is None:
                    raise StoreError(
                        f"the reduction's input ({report.input.sha256[:12]}) is not a stored variant "
                        "of this LoRA; not added"
                    )
            info, record = core.store_file(out, expect_sha256=report.output.sha256)
            _crashpoint("add_variant:after-store")
            with core.db.write() as s:
                # The blob is still there (gc on another node may have taken it since: stored again), and stays.
                core.record_blobs(s, [record], restore=lambda: core.store_file(out, expect_sha256=info.sha256))
                variant = repo.record_reduction(s, lora_id, info.sha256, info.bytes, source_row.id, report, actor)
                view = variant_view(variant, info.bytes)
            _crashpoint("add_variant:after-commit")
            return view

    def refresh_claims(self, lora: LoraRef) -> int:
        with self.core.db.read() as s:
            lora_id = self.refs.find_lora(s, lora).id
        return self.core.refresh_claims(lora_id)

    def _refresh_claims_quietly(self, lora_id: int) -> None:
        """Claims are a convenience: failing to record them never fails the ingest they follow
        (the next ingest of the path or `verify` records them)."""
        try:
            self.refresh_claims(lora_id)
        except (LoradError, SQLAlchemyError, OSError) as e:
            log.warning("could not record sidecar hashes", lora=lora_id, error=shown(str(e)))
