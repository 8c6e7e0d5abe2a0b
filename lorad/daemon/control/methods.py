"""The daemon's control methods: params (already validated by the protocol) -> a JSON result.

Every path a client names must lie inside a watched folder, else `outside_watch`; unknown LoRAs
are `not_found`. Mutations go through the Library, which records the caller as the actor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorad import __version__
from lorad.daemon.control.protocol import INT_MAX, LIST_PAGE, VERSION, Code, ControlError
from lorad.daemon.control.server import Handler, Peer
from lorad.daemon.control.views import brief_json, effect_json, find_json, lora_json, refused_path_json
from lorad.engine.formats.safetensors_file import is_complete
from lorad.errors import StoreError
from lorad.library import effects, listing
from lorad.library.hashes import HashQueryError

if TYPE_CHECKING:
    from lorad.daemon.config import Config, Policy
    from lorad.daemon.queue import JobView, Queue
    from lorad.daemon.watch import Signature, Watcher
    from lorad.daemon.worker import Gate
    from lorad.library.library import Library


class DaemonParts(Protocol):
    """What the control methods use of the running daemon (lorad.daemon.daemon.Daemon has it)."""

    config: Config
    library: Library
    queue: Queue
    gate: Gate
    watcher: Watcher
    workers: Sequence[object]
    device: str
    started: float  # time.monotonic() at start

    def waiting(self) -> str | None: ...
    def running_jobs(self) -> list[dict[str, Any]]: ...
    def watched(self, text: str | os.PathLike[str]) -> Path: ...
    def put(self, operation: Callable[[], Any]) -> Any: ...
    def ingest(self, path: Path, policy: str, actor: str, sig: Signature | None = None) -> Any: ...
    def enqueue_original(self, view: Any, policy: Policy, explicit: bool = False) -> tuple[JobView, bool]: ...
    def retry(self) -> list[int]: ...
    def collect(self, dry_run: bool, actor: str) -> Any: ...
    def drain(self) -> dict[str, Any]: ...
    def resume(self) -> dict[str, Any]: ...


def build(daemon: DaemonParts) -> dict[str, Handler]:
    m = Methods(daemon)
    return {name: getattr(m, name) for name in (
        "hello", "status", "list", "show", "find", "report", "revert", "switch", "reduce",
        "effect_files", "record_effect", "pause", "resume", "drain", "rescan", "verify", "gc",
    )}  # fmt: skip


class Methods:
    def __init__(self, daemon: DaemonParts) -> None:
        self.d = daemon
        self._last_read: dict[str, Any] = {}  # status's figures from the database, as last read

    # reading -----------------------------------------------------------------------------

    def hello(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"v": VERSION, "daemon": "lorad", "version": __version__, "pid": os.getpid(),
                "methods": sorted(build(self.d))}  # fmt: skip

    def status(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        recorded = self._recorded()
        counts, totals = recorded["queue"], recorded["totals"]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - d.started, 1),
            "device": d.device,
            "workers": len(d.workers),
            "paused": d.gate.paused,
            "draining": d.gate.draining,
            "in_window": d.gate.in_window,
            "waiting": d.waiting(),
            "queue": counts,
            "queue_depth": counts["pending"] + counts["running"],
            "running": d.running_jobs(),
            "loras": totals["loras"],
            "original_bytes": totals["original_bytes"],
            "active_bytes": totals["active_bytes"],
            "saved_bytes": totals["saved_bytes"],
            "watch": [{"path": str(w.path), "policy": w.policy, "recursive": w.recursive} for w in d.config.watch],
            "watcher_alive": d.watcher.alive(),
            "reconciles": d.watcher.reconciles,
            "pending_files": len(d.watcher.settler.pending()),
            "refused_files": len(d.watcher.refused()),
            "ingesting": d.watcher.progress.now(),  # {"done", "total"} of the files scans found
            "files_hashed": recorded["files_hashed"],
            "node": d.config.node,
            "store_dir": str(d.library.store.root),
            "store_id": d.library.store_id,
            # The fleet as the database has it: nodes, and which node watches each folder.
            "fleet": self._fleet(),
            # Whether the database answers; while it does not, the figures above are the last read
            # (`as_of`) and the fleet holds only an error.
            "database": {**d.library.db.health.to_json(), "as_of": recorded["as_of"]},
        }

    def _recorded(self) -> dict[str, Any]:
        """The queue's counts, the library's totals and the files hashed: read now, or (the
        database unreachable) as last read; status must answer without the database."""
        d = self.d
        if d.library.db.health.reachable or not self._last_read:
            try:
                totals = d.library.totals()
                self._last_read = {
                    "queue": d.queue.counts(),
                    "totals": {"loras": totals.loras, "original_bytes": totals.original_bytes,
                               "active_bytes": totals.active_bytes, "saved_bytes": totals.saved_bytes},
                    "files_hashed": d.library.files_hashed,
                    "as_of": datetime.now(timezone.utc).isoformat(),
                }  # fmt: skip
            except StoreError:  # (DatabaseUnavailable) what was last read, if anything
                if not self._last_read:
                    return {"queue": {"pending": 0, "running": 0, "done": 0, "failed": 0},
                            "totals": {"loras": 0, "original_bytes": 0, "active_bytes": 0, "saved_bytes": 0},
                            "files_hashed": 0, "as_of": None}  # fmt: skip
        return self._last_read

    def _fleet(self) -> dict[str, Any] | None:
        fleet = getattr(self.d, "fleet", None)
        if fleet is None:
            return None
        try:
            if not self.d.library.db.health.reachable:  # (not waited on: a status answers at once)
                raise StoreError("the database cannot be reached")
            return fleet.view()  # type: ignore[no-any-return]
        except StoreError as e:  # the database unavailable for now: what this node knows
            folders = [{"path": str(f), "node": None, "expires_in_s": None, "here": here}
                       for f, here in fleet.holding().items()]  # fmt: skip
            return {"error": str(e), "nodes": [], "folders": folders}

    def list(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """One page of the watched LoRAs, then of the paths lorad refused (lorad.library.listing):
        {"loras", "total" (on the first page; null after), "next" (the cursor to pass as `after`;
        null on the last page)}. `brief`: each LoRA as the table shows it (views.brief_json), read
        in the page's own query, instead of with all its variants."""
        folder = params.get("folder")
        limit = LIST_PAGE if params.get("limit") is None else params["limit"]
        if limit < 1:
            raise ControlError(Code.BAD_PARAMS, "list: param 'limit' must be at least 1")
        refusals = {str(r.path): r for r in self.d.library.refusals() if r.lora_id is None}
        refused = [listing.Refused(path, self._watch_policy(r.path)) for path, r in refusals.items()]
        try:
            page = self.d.library.list_page(
                refused, folder=str(self.d.watched(folder)) if folder else None, policy=params.get("policy"),
                state=params.get("state"), sort=params["sort"], after=params.get("after"), limit=min(limit, LIST_PAGE),
                brief=params["brief"],
            )  # fmt: skip
        except ValueError as e:
            raise ControlError(Code.BAD_PARAMS, f"list: {e}") from None
        if params["brief"]:
            loras = [brief_json(e.path, e.id, e.state, e.brief) if e.brief is not None
                     else {**self._refused_json(refusals[e.path]), "state": e.state} for e in page.entries]  # fmt: skip
            return {"loras": loras, "total": page.total, "next": page.next}
        views = {v.id: v for v in self.d.library.loras([e.id for e in page.entries if e.id is not None])}
        loras = []
        for entry in page.entries:
            if entry.id is None:
                loras.append({**self._refused_json(refusals[entry.path]), "state": entry.state})
            elif entry.id in views:
                loras.append({**lora_json(views[entry.id]), "state": entry.state})
        return {"loras": loras, "total": page.total, "next": page.next}

    def show(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        refused = self._refused_only(params["target"])
        if refused is not None:
            return refused
        ref = self._lora_ref(params["target"])
        try:
            view = self.d.library.lora(ref)
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None
        doc = lora_json(view)
        doc["jobs"] = [j.to_json() for j in self.d.queue.jobs(lora_id=view.id)]
        doc["events"] = [
            {"at": e.at.isoformat(), "kind": e.kind, "actor": e.actor, "variant": e.variant_id, "detail": e.detail}
            for e in self.d.library.events(view.id, limit=50)
        ]
        doc["modules"] = self.d.library.module_metrics(view.active_variant_id) if view.active_variant_id else []
        doc["effects"] = [effect_json(e, full=True) for e in self.d.library.effects(view.id)]
        return doc

    def find(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        try:
            return find_json(self.d.library.find_hash(params["hash"]))
        except HashQueryError as e:
            raise ControlError(Code.BAD_PARAMS, f"find: {e}") from None

    def report(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        from lorad.report import docs as report_docs

        target, everything = params.get("target"), params["all"]
        if (target is None) == (not everything):
            raise ControlError(Code.BAD_PARAMS, "report: give a LoRA (target) or all=true, not both")
        if everything:
            return report_docs.library_doc(self.d.library)
        try:
            return report_docs.lora_doc(self.d.library, self._lora_ref(target))
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None

    # changing ----------------------------------------------------------------------------

    def revert(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        path = self._known(params["path"])
        return lora_json(self.d.put(lambda: self.d.library.revert(path, actor=peer.actor())))

    def switch(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        path = self._known(params["path"])
        variant = params["variant"]
        view = self.d.library.lora(path)
        if view.variant(variant) is None:
            have = ", ".join(str(v.id) for v in view.variants)
            raise ControlError(Code.NOT_FOUND, f"{path} has no variant {variant} (it has: {have})")
        return lora_json(self.d.put(lambda: self.d.library.switch(path, variant, actor=peer.actor())))

    def reduce(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        path = self.d.watched(params["path"])
        watch = self.d.config.watch_for(path)
        name = params.get("policy") or (watch.policy if watch else None)
        policy = self.d.config.policies.get(name or "")
        if policy is None:
            raise ControlError(Code.NOT_FOUND, f"no policy named {name!r} (defined: {', '.join(self.d.config.policies)})")
        if not path.is_file():
            raise ControlError(Code.NOT_FOUND, f"{path}: no such file")
        if not is_complete(path):
            raise ControlError(Code.CONFLICT, f"{path}: not a complete safetensors file (still being written?)")
        view = self.d.ingest(path, watch.policy if watch else policy.name, actor=peer.actor())
        job, created = self.d.enqueue_original(view, policy, explicit=True)
        return {"job": job.to_json(), "created": created, "lora": lora_json(view)}

    def effect_files(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The files `lorad effect` reads (lorad.library.effects.Sources): the CLI measures them in
        its own process (the daemon never loads a base model for it), then calls record_effect."""
        ref = self._lora_ref(params["target"])
        try:
            sources = self.d.library.effect_sources(ref, params.get("variant"))
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None
        return {"lora": sources.lora_id, "path": str(sources.path),
                "variant": _stored_json(sources.variant), "reference": _stored_json(sources.reference)}  # fmt: skip

    def record_effect(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        ref = self._lora_ref(params["target"])
        try:
            view = self.d.library.lora(ref)
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None
        variant = view.variant(params["variant"])
        if variant is None:
            have = ", ".join(str(v.id) for v in view.variants)
            raise ControlError(Code.NOT_FOUND, f"{view.path} has no variant {params['variant']} (it has: {have})")
        if variant.kind != "reduced":
            raise ControlError(Code.BAD_PARAMS, f"record_effect: variant {variant.id} of {view.path} is the original; "
                                                "only a reduction's effect is measured against it")  # fmt: skip
        try:
            figures = effects.parse(params["effect"])
        except effects.EffectError as e:
            raise ControlError(Code.BAD_PARAMS, f"record_effect: param 'effect': {e}") from None
        try:
            effect = self.d.library.record_effect(variant.id, figures, params.get("reference"), actor=peer.actor())
        except StoreError as e:
            raise ControlError(Code.CONFLICT, str(e)) from None
        return {"lora": lora_json(self.d.library.lora(view.id)), "effect": effect_json(effect)}

    def pause(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.d.gate.set_paused(True)
        return {"paused": True, "running": self.d.running_jobs()}

    def resume(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self.d.resume()

    def drain(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self.d.drain()

    def rescan(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        before = self.d.watcher.reconciles
        self.d.watcher.request_reconcile(f"requested by uid {peer.uid}")
        # A rescan is "look again": jobs that failed for reasons that may have passed (a full disk)
        # are tried again too, not only at the next retry timer.
        retried = self.d.retry()
        return {"requested": True, "reconciles_before": before, "retried_jobs": retried}

    def verify(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        report = self.d.library.verify(actor=peer.actor())
        return {
            "ok": report.ok,
            "blobs_checked": report.blobs_checked,
            "corrupt": list(report.corrupt),
            "missing": list(report.missing),
            "repaired": list(report.repaired),
            "stray": list(report.stray),
            "reconciled": [{"lora": r.lora_id, "path": str(r.path), "from": r.from_variant, "to": r.to_variant,
                            "new_original": r.new_original} for r in report.reconciled],  # fmt: skip
            "missing_files": [str(p) for p in report.missing_files],
            "unsettled": [str(p) for p in report.unsettled],
            "refused": [{"path": str(p), "reason": reason} for p, reason in report.refused],
            "temp_removed": [str(p) for p in report.temp_removed],
            "store_identity": report.store_identity,
        }

    def gc(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        plan = self.d.collect(dry_run=params["dry_run"], actor=peer.actor())
        return {
            "executed": plan.executed,
            "variants": list(plan.variants),
            "blobs": [{"sha256": sha, "bytes": n} for sha, n in plan.blobs],
            "stray": [{"sha256": sha, "bytes": n} for sha, n in plan.stray],
            "bytes_freed": plan.bytes_freed,
            "skipped": plan.skipped,  # why nothing was collected (another node holds gc), or null
        }

    # helpers -----------------------------------------------------------------------------

    def _lora_ref(self, target: int | str) -> int | Path:
        """A LoRA id (a number, or ASCII digits) or a watched path."""
        if isinstance(target, str) and target.isascii() and target.isdigit():
            target = int(target)  # under PATH_MAX digits: within Python's int-string limit
            if target > INT_MAX:  # SQLite could not even be asked
                raise ControlError(Code.NOT_FOUND, f"no LoRA with id {target}")
        if isinstance(target, int):
            return target
        return self.d.watched(target)

    def _refused_json(self, r: Any) -> dict[str, Any]:
        watch = self.d.config.watch_for(r.path)
        return refused_path_json(r, watch.path if watch else r.path.parent, watch.policy if watch else None)

    def _watch_policy(self, path: Path) -> str | None:
        watch = self.d.config.watch_for(path)
        return watch.policy if watch else None

    def _refused_only(self, target: int | str) -> dict[str, Any] | None:
        """`show` of a watched path lorad refused and holds no LoRA for: the refusal. Looked up
        by the name as given (a symlink leading outside is refused under its own name)."""
        if not isinstance(target, str) or target.isdigit():
            return None
        path = os.path.abspath(os.path.expanduser(target))
        if self.d.config.watch_for(Path(path)) is None:
            return None
        refusal = self.d.library.refusal(path)
        if refusal is None or refusal.lora_id is not None:
            return None
        return {**self._refused_json(refusal), "jobs": [], "events": [], "modules": []}

    def _known(self, text: str) -> Path:
        path = self.d.watched(text)
        try:
            self.d.library.lora(path)
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None
        return path


def _stored_json(v: effects.Stored) -> dict[str, Any]:
    return {"id": v.variant_id, "kind": v.kind, "method": v.method, "param": v.param, "sha256": v.sha256,
            "folder": v.folder, "name": v.name,
            "files": [{"name": name, "path": str(path), "mode": mode} for name, path, mode in v.files]}  # fmt: skip
