"""The daemon's control methods: params (already validated by the protocol) -> a JSON result.

Every path a client names must lie inside a watched folder, else `outside_watch`; unknown LoRAs
are `not_found`. Mutations go through the Library, which records the caller as the actor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad import __version__
from lorad.control.protocol import VERSION, Code, ControlError
from lorad.control.server import Handler, Peer
from lorad.control.views import lora_json, saved_bytes
from lorad.errors import StoreError
from lorad.formats.safetensors_file import is_complete

if TYPE_CHECKING:
    from lorad.daemon import Daemon


def build(daemon: Daemon) -> dict[str, Handler]:
    m = Methods(daemon)
    return {name: getattr(m, name) for name in (
        "hello", "status", "list", "show", "revert", "switch", "reduce",
        "pause", "resume", "rescan", "verify", "gc",
    )}  # fmt: skip


class Methods:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    # reading -----------------------------------------------------------------------------

    def hello(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"v": VERSION, "daemon": "lorad", "version": __version__, "pid": os.getpid(),
                "methods": sorted(build(self.d))}  # fmt: skip

    def status(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        loras = [lora_json(v) for v in d.library.loras()]
        original, active, saved = saved_bytes(loras)
        counts = d.queue.counts()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - d.started, 1),
            "device": d.device,
            "workers": len(d.workers),
            "paused": d.gate.paused,
            "in_window": d.gate.in_window,
            "queue": counts,
            "queue_depth": counts["pending"] + counts["running"],
            "running": d.running_jobs(),
            "loras": len(loras),
            "original_bytes": original,
            "active_bytes": active,
            "saved_bytes": saved,
            "watch": [{"path": str(w.path), "policy": w.policy, "recursive": w.recursive} for w in d.config.watch],
            "watcher_alive": d.watcher.alive(),
            "reconciles": d.watcher.reconciles,
            "pending_files": len(d.watcher.settler.pending()),
        }

    def list(self, params: dict[str, Any], peer: Peer) -> list[dict[str, Any]]:
        folder = params.get("folder")
        prefix = self.d.watched(folder) if folder else None
        loras = [lora_json(v) for v in self.d.library.loras()]
        if prefix is not None:
            loras = [x for x in loras if Path(x["path"]) == prefix or prefix in Path(x["path"]).parents]
        return sorted(loras, key=lambda x: x["path"])

    def show(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        target = params["target"]
        ref: int | Path = int(target) if isinstance(target, int) or str(target).isdigit() else self.d.watched(target)
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
        return doc

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

    def pause(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.d.gate.set_paused(True)
        return {"paused": True, "running": self.d.running_jobs()}

    def resume(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.d.gate.set_paused(False)
        return {"paused": False}

    def rescan(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        before = self.d.watcher.reconciles
        self.d.watcher.request_reconcile(f"requested by uid {peer.uid}")
        return {"requested": True, "reconciles_before": before}

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
            "temp_removed": [str(p) for p in report.temp_removed],
        }

    def gc(self, params: dict[str, Any], peer: Peer) -> dict[str, Any]:
        plan = self.d.collect(dry_run=params["dry_run"], actor=peer.actor())
        return {
            "executed": plan.executed,
            "variants": list(plan.variants),
            "blobs": [{"sha256": sha, "bytes": n} for sha, n in plan.blobs],
            "stray": [{"sha256": sha, "bytes": n} for sha, n in plan.stray],
            "bytes_freed": plan.bytes_freed,
        }

    # helpers -----------------------------------------------------------------------------

    def _known(self, text: str) -> Path:
        path = self.d.watched(text)
        try:
            self.d.library.lora(path)
        except StoreError as e:
            raise ControlError(Code.NOT_FOUND, str(e)) from None
        return path
