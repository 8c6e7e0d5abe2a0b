"""Write a reduced LoRA in its input's own format: same keys, new factors, honest metadata."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad import __version__
from lorad._atomic import replacing
from lorad.engine.formats import detect, scales
from lorad.engine.formats.adapter_config import lora_fields
from lorad.engine.formats.encode import TORCH_TO_ST, Encoding
from lorad.engine.formats.lora import PEFT_CONFIG, PEFT_WEIGHTS, LoraSource, Module
from lorad.engine.formats.safetensors_file import RawTensor, data_sha256, legacy_hash, read_raw, serialize, write_file
from lorad.engine.formats.scales import DIFFUSERS_METADATA_KEY

_STALE_KEYS = (DIFFUSERS_METADATA_KEY, "sshs_model_hash", "sshs_legacy_hash")
_LEGACY_PLACEHOLDER = "0" * 8


@dataclass(frozen=True)
class ModuleOutput:
    module: Module
    rank: int
    up: torch.Tensor  # in the output dtype and layout, scale already folded
    down: torch.Tensor
    bias: torch.Tensor | None = None  # lora_B.bias, rescaled with the fold so scale * bias is kept


@dataclass(frozen=True)
class Written:
    path: Path  # the file or PEFT directory written
    weights: Path  # its safetensors file
    bytes: int  # of the safetensors file
    sha256: str  # of the safetensors file


def raw(t: torch.Tensor) -> RawTensor:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return RawTensor(TORCH_TO_ST[t.dtype], tuple(t.shape), flat.view(torch.uint8).numpy().data)


def _alpha_raw(value: float, dtype: torch.dtype) -> RawTensor:
    t = torch.tensor(value, dtype=dtype)
    if float(t) != value:  # e.g. a bf16 alpha key cannot hold 257: never write a rounded alpha
        t = torch.tensor(value, dtype=torch.float32)
    return raw(t)


def build_tensors(source: LoraSource, outputs: dict[str, ModuleOutput], enc: Encoding) -> dict[str, RawTensor]:
    """Every output tensor in the input's key order; new alpha keys follow their module's down key.

    A module rebuilt as plain LoRA (from LoHa/LoKr) loses its old keys; its lora_up, lora_down
    and alpha take the place of the first of them.
    """
    replaced: dict[str, RawTensor] = {}
    inserted: dict[str, list[tuple[str, RawTensor]]] = {}
    dropped: set[str] = set()
    for out in outputs.values():
        keys, name = out.module.keys, out.module.name
        alpha = _alpha_raw(enc.written_alpha(out.rank), enc.alpha_dtype)
        if "up" not in keys:
            first = min(keys.values(), key=lambda k: source.header.tensors[k].start)
            dropped.update(keys.values())
            new = [(f"{name}.lora_up.weight", raw(out.up)), (f"{name}.lora_down.weight", raw(out.down))]
            inserted[first] = new + ([(f"{name}.alpha", alpha)] if enc.style == detect.ALPHA_KEYS else [])
            continue
        replaced[keys["up"]] = raw(out.up)
        replaced[keys["down"]] = raw(out.down)
        if out.bias is not None:
            replaced[keys["up_bias"]] = raw(out.bias)
        if "alpha" in keys:
            replaced[keys["alpha"]] = alpha
        elif enc.style == detect.ALPHA_KEYS:
            inserted[keys["down"]] = [(f"{name}.alpha", alpha)]
    tensors: dict[str, RawTensor] = {}
    for key, entry in source.header.tensors.items():
        if key not in dropped:
            tensors[key] = replaced.get(key) or RawTensor(entry.dtype, entry.shape, read_raw(source.header, key))
        tensors.update(inserted.get(key, ()))
    return tensors


def build_metadata(
    source: LoraSource, outputs: dict[str, ModuleOutput], enc: Encoding, provenance: dict[str, str]
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


def module_ranks_alphas(source: LoraSource, outputs: dict[str, ModuleOutput], enc: Encoding,
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


def _update_kohya(meta: dict[str, str], ranks: list[int], outputs: dict[str, ModuleOutput], enc: Encoding,
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


def _diffusers_metadata(source: LoraSource, outputs: dict[str, ModuleOutput], enc: Encoding) -> dict[str, object]:
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


def write_safetensors(path: Path, tensors: dict[str, RawTensor], meta: dict[str, str], hashes: bool) -> tuple[int, str]:
    """Write (path is a temp name the caller renames); return (bytes, sha256 of the file).

    The data section's hash does not depend on the header, so sshs_model_hash can be written into
    the header it describes. sshs_legacy_hash covers the final file's bytes at 1 MiB: it is
    computed over the layout with a fixed-length placeholder, then filled in.
    """
    if hashes:
        data_hash = data_sha256(tensors)
        meta = dict(meta, sshs_model_hash=data_hash, sshs_legacy_hash=_LEGACY_PLACEHOLDER)
        meta["sshs_legacy_hash"] = legacy_hash(serialize(tensors, meta))
        if "modelspec.hash_sha256" in meta:
            meta["modelspec.hash_sha256"] = "0x" + data_hash
    return write_file(path, tensors, meta)


def write_lora(
    source: LoraSource,
    outputs: dict[str, ModuleOutput],
    enc: Encoding,
    dst: Path,
    provenance: dict[str, str],
    check: Callable[[Path, dict[str, RawTensor]], None] = lambda _written, _data: None,
) -> Written:
    """Write `dst` atomically; `check(temp path, the tensors written)` runs on the complete temp file
    or folder before it is renamed into place, and may refuse it by raising (then nothing is left
    behind). The tensors are handed over so that the check need not read the data back."""
    tensors = build_tensors(source, outputs, enc)
    meta = build_metadata(source, outputs, enc, provenance)
    hashes = source.format != "peft"
    if source.peft_config is None:
        with replacing(dst) as tmp:
            size, sha = write_safetensors(tmp, tensors, meta, hashes)
            check(tmp, tensors)
        return Written(dst, dst, size, sha)
    with replacing(dst) as tmp:
        tmp.mkdir()
        _copy_side_files(source.path, tmp)
        size, sha = write_safetensors(tmp / PEFT_WEIGHTS, tensors, meta, hashes)
        _write_json(tmp / PEFT_CONFIG, _peft_config(source, outputs, enc))
        check(tmp, tensors)
    return Written(dst, dst / PEFT_WEIGHTS, size, sha)


def _peft_config(source: LoraSource, outputs: dict[str, ModuleOutput], enc: Encoding) -> dict[str, object]:
    """The input's config with r, lora_alpha and the patterns rewritten for every module."""
    config = dict(source.peft_config or {})
    entries = module_ranks_alphas(source, outputs, enc, rslora=bool(config.get("use_rslora")))
    fields = lora_fields({scales.config_path(name, True): entry for name, entry in entries.items()})
    fields.pop("target_modules")  # the input's own list (names or a regex) still selects the same layers
    config.update(fields)
    return config


def _copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    for item in src_dir.iterdir():
        if item.name in (PEFT_WEIGHTS, PEFT_CONFIG) or not item.is_file():
            continue
        shutil.copy2(item, dst_dir / item.name)


def _write_json(path: Path, doc: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
