"""Plain JSON views of the library's records, shared by the daemon's replies and the CLI's tables."""

from __future__ import annotations

from typing import Any

from lorad.library.records import servers_for


def variant_json(v: Any, active_id: int | None) -> dict[str, Any]:
    return {
        "id": v.id,
        "kind": v.kind,
        "method": v.method,
        "param": v.param,
        "bytes": v.bytes,
        # One quality figure, named as in the engine's report, the decision and the HTML report:
        # the whole file's (energy-weighted); the module mean and min are named as what they are.
        "fro_retained_file": v.fro_retained_file,
        "fro_retained_mean": v.fro_retained_mean,
        "fro_retained_min": v.fro_retained_min,
        "active": v.id == active_id,
        "sha256": v.blob_sha256,
        "source_variant": v.source_variant_id,
        "created_at": v.created_at.isoformat() if v.created_at else None,
        "ranks": _rank_span(v.ranks),
        "serve": v.serve,
        "rank_rule": v.rank_rule,
        "servers": list(v.servers) if v.servers is not None else None,  # None: ranks unknown
        # Its latest measured effect on a base model (lorad effect), a second figure beside the
        # Frobenius one; None when never measured.
        "effect_retained": v.effect.effect_retained if v.effect else None,
        "effect_retained_min": v.effect.effect_retained_min if v.effect else None,
        "effect": effect_json(v.effect) if v.effect else None,
    }


def brief_json(path: str, lora_id: int, state: str, b: Any) -> dict[str, Any]:
    """A LoRA as `lorad list`'s table shows it (lorad.library.listing.Brief): its sizes, its active
    variant and how many variants it has, without the variants themselves."""
    active = None
    if b.active_id is not None:
        active = {
            "id": b.active_id, "kind": b.active_kind, "method": b.active_method, "param": b.active_param,
            "servers": None if b.active_ranks is None else list(servers_for(tuple(b.active_ranks))),
            "effect_retained": b.effect[0] if b.effect else None,
            "effect_retained_min": b.effect[1] if b.effect else None,
        }  # fmt: skip
    refused = None
    if b.refusal is not None:
        cause, reason, since, last = b.refusal
        refused = {"cause": cause, "reason": reason, "since": since.isoformat(), "last_seen": last.isoformat()}
    return {"id": lora_id, "kind": b.kind, "path": path, "state": state, "original_bytes": b.original_bytes,
            "active_bytes": b.active_bytes, "variant_count": b.variants, "active": active, "refused": refused}  # fmt: skip


def effect_json(e: Any, full: bool = False) -> dict[str, Any]:
    """An effect measurement (lorad.library.records.EffectView); `full`: with its per-sample
    figures and its sample set."""
    doc = {
        "variant": e.variant_id,
        "reference_variant": e.reference_variant_id,
        "kind": e.kind,
        "effect_retained": e.effect_retained,
        "effect_retained_min": e.effect_retained_min,
        "kl_mean": e.kl_mean,
        "samples_id": e.samples_id,
        "base": e.base,
        "base_sha256": e.base_sha256,
        "seconds": e.seconds,
        "measured_at": e.measured_at.isoformat() if e.measured_at else None,
    }
    if full:
        doc["per_sample"] = list(e.per_sample)
        doc["samples"] = e.samples
    return doc


def _rank_span(ranks: Any) -> dict[str, Any] | None:
    if not ranks:
        return None
    return {"min": min(ranks), "max": max(ranks), "modules": len(ranks), "uniform": len(set(ranks)) == 1}


def lora_json(lora: Any) -> dict[str, Any]:
    original, active = lora.original, lora.active
    return {
        "id": lora.id,
        "kind": lora.kind,
        "path": str(lora.path),
        "mirror": str(lora.mirror) if lora.mirror else None,
        "folder": str(lora.folder),
        "policy": lora.policy,
        "active_variant": lora.active_variant_id,
        "original_variant": lora.original_variant_id,
        "original_bytes": original.bytes if original else None,
        "active_bytes": active.bytes if active else None,
        "variants": [variant_json(v, lora.active_variant_id) for v in lora.variants],
        "refused": refusal_json(lora.refused) if lora.refused else None,
    }


def refusal_json(r: Any) -> dict[str, Any]:
    return {"cause": r.cause, "reason": r.reason, "since": r.first_seen.isoformat(), "last_seen": r.last_seen.isoformat()}


def refused_path_json(r: Any, folder: Any, policy: str | None) -> dict[str, Any]:
    """A watched path lorad has no LoRA for because it refused the file: a `list` entry shaped
    like a LoRA's (no id, no variants) with the refusal."""
    return {
        "id": None,
        "kind": None,
        "path": str(r.path),
        "mirror": None,
        "folder": str(folder),
        "policy": policy,
        "active_variant": None,
        "original_variant": None,
        "original_bytes": None,
        "active_bytes": None,
        "variants": [],
        "refused": refusal_json(r),
    }


def find_json(result: Any) -> dict[str, Any]:
    """A `find` result (lorad.library.records.FindResult): per match the LoRA, the variant with the hash
    (None: a sidecar's claim that no stored variant has), whether that variant is the one at the
    path now, and which hashes matched."""
    matches = []
    for m in result.matches:
        lora = lora_json(m.lora)
        variant = next((v for v in lora["variants"] if v["id"] == m.variant_id), None)
        matches.append({"lora": lora, "variant": variant, "active": bool(variant and variant["active"]),
                        "hits": [h.to_json() for h in m.hits]})  # fmt: skip
    return {"query": result.query, "matches": matches, "blake3_pending": result.blake3_pending}


def saved_bytes(loras: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(bytes of the originals, bytes the watched files hold now, bytes saved)."""
    original = sum(x["original_bytes"] or 0 for x in loras)
    active = sum(x["active_bytes"] or 0 for x in loras if x["original_bytes"])
    return original, active, original - active
