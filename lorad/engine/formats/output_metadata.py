"""The metadata and config a reduced LoRA is written with: its input's own, restated for the new
ranks and alphas, without the keys that would describe the old file, and with lorad's provenance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from lorad import __version__
from lorad.engine.formats import scales
from lorad.engine.formats.adapter_config import lora_fields
from lorad.engine.formats.encode import Encoding
from lorad.engine.formats.lora import LoraSource, Module
from lorad.engine.formats.scales import DIFFUSERS_METADATA_KEY

_STALE_KEYS = (DIFFUSERS_METADATA_KEY, "sshs_model_hash", "sshs_legacy_hash")


@dataclass(frozen=True)
class Reduced:
    """A module as written: which it is, and the rank it has now."""

    module: Module
    rank: int


def build_metadata(
    source: LoraSource, outputs: dict[str, Reduced], enc: Encoding, provenance: dict[str, str]
) -> dict[str, str]:
    meta = {k: v for k, v in source.header.metadata.items() if k not in _STALE_KEYS}
    ranks = [o.rank for o in outputs.values()]
    kohya_like = source.format.startswith("kohya") or any(k.startswith("ss_") for k in meta)
    if kohya_like and ranks:
        _update_kohya(meta, ranks, outputs, enc, provenance)
    if source.writes_diffusers_metadata:
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(_diffusers_metadata(source, outputs, enc), sort_keys=True)
        meta.setdefault("format", "pt")
    meta.update(provenance)
    return meta


def module_ranks_alphas(source: LoraSource, outputs: dict[str, Reduced], enc: Encoding,
                        rslora: bool = False) -> dict[str, tuple[int, float]]:
    """Module name -> (rank, alpha) as a PEFT config must state it, for every LoRA-shaped module:
    reduced ones at their new rank and the encoding's alpha, passed-through ones as they were."""
    entries: dict[str, tuple[int, float]] = {}
    for m in source.modules:
        if m.name in outputs:
            k = outputs[m.name].rank
            entries[m.name] = (k, enc.written_alpha(k))
        elif m.rank > 0 and m.readings is not None and m.readings.metadata is not None:
            alpha = m.readings.metadata * (math.sqrt(m.rank) if rslora else m.rank)
            entries[m.name] = (m.rank, _round_alpha(alpha))
    return entries


def _round_alpha(alpha: float) -> float:
    # alpha / r * r in floating point: give back the integer the config most likely held
    nearest = round(alpha)
    return float(nearest) if abs(alpha - nearest) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def _update_kohya(meta: dict[str, str], ranks: list[int], outputs: dict[str, Reduced], enc: Encoding,
                  provenance: dict[str, str]) -> None:
    uniform = len(set(ranks)) == 1
    meta["ss_network_dim"] = str(ranks[0]) if uniform else "Dynamic"
    if enc.alpha is not None:
        meta["ss_network_alpha"] = _number(enc.alpha)
    conv = [o.rank for o in outputs.values() if o.module.kernel and o.module.kernel != (1, 1)]
    if "ss_network_args" in meta and conv:
        try:
            args = json.loads(meta["ss_network_args"])
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            args["conv_dim"] = str(max(conv))
            if enc.alpha is not None:
                args["conv_alpha"] = _number(enc.alpha)
            meta["ss_network_args"] = json.dumps(args)
    comment = f"lorad {provenance['lorad.method']} {provenance['lorad.param']}: ranks {min(ranks)}-{max(ranks)}"
    old = meta.get("ss_training_comment")
    meta["ss_training_comment"] = f"{comment}; {old}" if old and old != "None" else comment


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _diffusers_metadata(source: LoraSource, outputs: dict[str, Reduced], enc: Encoding) -> dict[str, object]:
    """Minimal LoraConfig per component (r, lora_alpha, target_modules, rank_pattern, alpha_pattern;
    lora_bias where modules carry lora_B.bias, or diffusers would drop the biases).

    Never the input's own metadata: a stale r or a newer PEFT's extra fields break loading.
    """
    by_component: dict[str, dict[str, tuple[int, float]]] = {}
    biased: set[str] = set()
    for name, entry in module_ranks_alphas(source, outputs, enc).items():
        comp = scales.component(name) or "unet"
        by_component.setdefault(comp, {})[_metadata_path(comp, name)] = entry
    for m in source.modules:
        if "up_bias" in m.keys:
            biased.add(scales.component(m.name) or "unet")
    flat: dict[str, object] = {}
    for comp, entries in sorted(by_component.items()):
        fields = lora_fields(entries)
        if comp in biased:
            fields["lora_bias"] = True
        flat.update({f"{comp}.{k}": v for k, v in fields.items()})
    return flat


def _metadata_path(comp: str, name: str) -> str:
    """The module path written in metadata. transformers 5 dropped `text_model.` from CLIP's module
    names and diffusers strips it from tensor keys, not from metadata: without it the path still
    matches both stacks, since PEFT matches pattern keys and target names by suffix."""
    path = scales.config_path(name, False)
    if comp.startswith("text_encoder"):
        path = path.removeprefix("text_model.")
    return path


def provenance_keys(source_sha256: str, method: str, param: float | None, extra: dict[str, str]) -> dict[str, str]:
    keys = {
        "lorad.version": __version__,
        "lorad.source_sha256": source_sha256,
        "lorad.method": method,
        "lorad.param": "" if param is None else _number(param),
    }
    keys.update(extra)
    return keys


def peft_config(source: LoraSource, outputs: dict[str, Reduced], enc: Encoding) -> dict[str, object]:
    """The input's config with r, lora_alpha and the patterns rewritten for every module."""
    config = dict(source.peft_config or {})
    entries = module_ranks_alphas(source, outputs, enc, rslora=bool(config.get("use_rslora")))
    fields = lora_fields({scales.config_path(name, True): entry for name, entry in entries.items()})
    fields.pop("target_modules")  # the input's own list (names or a regex) still selects the same layers
    config.update(fields)
    return config
