"""The documents lorad.report.html renders, assembled from the records (read only).

`lora_doc` is the input of `render_lora`, `library_doc` that of `render_library` (see
lorad.report.html's docstring for both contracts). The daemon's `report` method returns them; the
CLI renders and writes the page, so the daemon never writes outside its state and watched folders.

Per variant: its hashes (sha256, AutoV2, AutoV3, BLAKE3), the whole file's retained Frobenius ratio
(`fro_retained_file`, each module weighted by its energy: the figure `list`, `show` and the decision
give; None for variants recorded before lorad kept it) and the weakest module's, the rank rule and server it was made for, the
servers whose rank rules it meets as it is (lorad.engine.reduce.rank_rules.servers_met: a reduced
variant's ranks from its module rows, an original's from its stored header), and the policy's
latest decision on it (the `decided` events), and its latest measured effect on a base model
(`effect_retained`, the mean over the sample set, and `effect_retained_min`, the worst sample; with
the base model, its hash, the sample set id and when; None when never measured: a second figure,
named apart from the Frobenius one). The modules and spectra are those of the variant shown: the
active one when it is a reduction, else the newest reduction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from lorad.engine.formats.keys import parse_key
from lorad.engine.formats.safetensors_file import read_header
from lorad.engine.reduce.rank_rules import servers_met
from lorad.errors import LoradError
from lorad.library.db import repo
from lorad.library.db.models import Blob, Lora, Variant
from lorad.library.records import EffectView, latest_effects

if TYPE_CHECKING:
    from lorad.library.library import Library, LoraRef

MODULE_FIELDS = ("name", "kind", "rank_in", "rank_out", "fro_retained", "rel_error", "params_in", "params_out",
                 "skipped")  # fmt: skip
DECISION_FIELDS = ("activate", "reason", "saving", "fro_retained_file")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


def lora_doc(lib: Library, ref: LoraRef) -> dict[str, Any]:
    """`render_lora`'s document for one LoRA (by id or watched path)."""
    lora_id = lib.lora(ref).id
    with lib.db.read() as s:
        row = s.get(Lora, lora_id)
        assert row is not None
        variants = list(repo.variants_of(s, lora_id))
        decisions = _decisions(s, lora_id)
        measured = latest_effects(s, [v.id for v in variants])
        shown = _shown(row, variants)
        modules = [{f: getattr(m, f) for f in MODULE_FIELDS} for m in repo.module_metrics_of(s, shown.id)] if shown else []
        docs = [_variant_doc(lib, s, v, row.active_variant_id, decisions.get(v.id), measured.get(v.id)) for v in variants]
        spectra = list((shown.details or {}).get("spectra") or []) if shown else []
        return {
            "generated_at": _now(),
            "lora": {"id": row.id, "path": row.path, "folder": row.folder, "policy": row.policy},
            "variants": docs,
            "modules": modules,
            "shown_variant_id": shown.id if shown else None,
            "spectra": [{"name": sp.get("name"), "values": list(sp.get("values") or []), "cut": sp.get("cut")}
                        for sp in spectra if isinstance(sp, dict)],  # fmt: skip
        }


def _shown(row: Lora, variants: Sequence[Variant]) -> Variant | None:
    reduced = [v for v in variants if v.kind == "reduced"]
    active = next((v for v in reduced if v.id == row.active_variant_id), None)
    return active or (max(reduced, key=lambda v: v.id) if reduced else None)


def _decisions(s: Session, lora_id: int) -> dict[int, dict[str, Any]]:
    """The latest policy decision on each variant."""
    out: dict[int, dict[str, Any]] = {}
    for e in repo.events(s, lora_id=lora_id):
        if e.kind == "decided" and e.variant_id is not None:
            detail = dict(e.detail or {})
            if "fro_retained_file" not in detail:  # decided before the figure had one name
                detail["fro_retained_file"] = detail.get("fro_retained")
            out[e.variant_id] = {f: detail.get(f) for f in DECISION_FIELDS}
    return out


def _variant_doc(lib: Library, s: Session, v: Variant, active_id: int | None,
                 decision: dict[str, Any] | None, effect: EffectView | None = None) -> dict[str, Any]:  # fmt: skip
    blob = s.get(Blob, v.blob_sha256)
    if v.kind == "reduced":
        ranks = [m.rank_out for m in repo.module_metrics_of(s, v.id) if m.skipped is None]
    else:
        ranks = _header_ranks(lib.store.path_of(v.blob_sha256))
    return {
        "id": v.id,
        "kind": v.kind,
        "active": v.id == active_id,
        "method": v.method,
        "param": v.param,
        "bytes": blob.bytes if blob else None,
        "sha256": v.blob_sha256,
        "autov2": blob.autov2 if blob else v.blob_sha256[:10],
        "autov3": blob.autov3 if blob else None,
        "blake3": blob.blake3 if blob else None,
        "fro_retained_file": v.fro_retained_file,
        "fro_retained_min": v.fro_retained_min,
        "created_at": _iso(v.created_at),
        "rank_rule": v.rank_rule,
        "serve": v.serve,
        "servers": servers_met(ranks) if ranks else [],  # no known ranks: no claim about servers
        "decision": decision,
        "effect_retained": effect.effect_retained if effect else None,
        "effect_retained_min": effect.effect_retained_min if effect else None,
        "effect": _effect_doc(effect) if effect else None,
    }


def _effect_doc(e: EffectView) -> dict[str, Any]:
    return {"kind": e.kind, "effect_retained": e.effect_retained, "effect_retained_min": e.effect_retained_min,
            "kl_mean": e.kl_mean, "base": e.base, "base_sha256": e.base_sha256, "samples_id": e.samples_id,
            "measured_at": _iso(e.measured_at), "reference_variant": e.reference_variant_id}  # fmt: skip


def _header_ranks(path: Path) -> list[int]:
    """The rank of each LoRA module of a stored file, from its header (the rows of its down/A
    factors); [] when the blob cannot be read (quarantined, missing)."""
    try:
        header = read_header(path)
    except (OSError, LoradError):
        return []
    ranks = []
    for name, entry in header.tensors.items():
        key = parse_key(name)
        if key is not None and key.role == "down" and entry.shape:
            ranks.append(int(entry.shape[0]))
    return ranks


def library_doc(lib: Library) -> dict[str, Any]:
    """`render_library`'s document: every watched folder with its bytes, every LoRA, and every
    watched path lorad refused (with why)."""
    rows: list[dict[str, Any]] = []
    with lib.db.read() as s:
        measured = latest_effects(s)
        for lora in repo.all_loras(s):
            variants = {v.id: v for v in repo.variants_of(s, lora.id)}
            original, active = variants.get(lora.original_variant_id or -1), variants.get(lora.active_variant_id or -1)
            refusal = repo.refusal_at(s, lora.path)
            rows.append({
                "id": lora.id,
                "path": lora.path,
                "folder": lora.folder,
                "active_kind": active.kind if active else None,
                "method": active.method if active else None,
                "param": active.param if active else None,
                "bytes_original": _bytes(s, original),
                "bytes_active": _bytes(s, active),
                "fro_retained_file": active.fro_retained_file if active and active.kind == "reduced" else None,
                "effect_retained": measured[active.id].effect_retained if active and active.id in measured else None,
                "effect_retained_min": measured[active.id].effect_retained_min if active and active.id in measured else None,
                "refused": f"{refusal.cause}: {refusal.reason}" if refusal is not None else None,
            })  # fmt: skip
    for r in lib.refusals():
        if r.lora_id is None:  # a path lorad holds no LoRA for: it refused the file from the start
            rows.append({"id": None, "path": str(r.path), "folder": _root_of(lib.roots, r.path), "active_kind": None,
                         "method": None, "param": None, "bytes_original": None, "bytes_active": None,
                         "fro_retained_file": None, "effect_retained": None, "effect_retained_min": None,
                         "refused": f"{r.cause}: {r.reason}"})  # fmt: skip
    folders = [str(root) for root in lib.roots]
    folders += sorted({x["folder"] for x in rows} - set(folders))  # LoRAs of folders no longer watched
    return {
        "generated_at": _now(),
        "folders": [_folder_doc(folder, rows) for folder in folders],
        "loras": sorted(rows, key=lambda x: x["path"]),
    }


def _bytes(s: Session, v: Variant | None) -> int | None:
    blob = s.get(Blob, v.blob_sha256) if v is not None else None
    return blob.bytes if blob is not None else None


def _root_of(roots: Sequence[Path], path: Path) -> str:
    where = Path(os.path.abspath(path))
    for root in roots:
        if where.is_relative_to(root) or where.resolve().is_relative_to(root):
            return str(root)
    return str(where.parent)


def _folder_doc(folder: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [x for x in rows if x["folder"] == folder and x["id"] is not None]
    return {
        "path": folder,
        "loras": len(mine),
        "bytes_original": sum(x["bytes_original"] or 0 for x in mine),
        # What the files hold now, for LoRAs whose original is known (as the library page sums it).
        "bytes_active": sum(x["bytes_active"] or 0 for x in mine if x["bytes_original"] is not None),
    }
