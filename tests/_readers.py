"""Independent readers of LoRA files: what each family of loaders makes of a file, module by module.

Nothing here imports lorad. Three readings, each module -> dW (float64, out x in_flat; for a PEFT
embedding LoRA the (num_embeddings x dim) update (B @ A)^T):

  tensor_only_deltas  ComfyUI (comfy/weight_adapter/lora.py), A1111 and Forge read a single file by
                      its tensors: scale = `.alpha` / rank (rank = rows of down) when an alpha key
                      exists (alpha 0 gives scale 0), else 1. Never metadata.
  metadata_deltas     diffusers / PEFT: a PEFT folder's adapter_config.json (r, lora_alpha,
                      rank_pattern, alpha_pattern matched as PEFT >= 0.15 does, rsLoRA alpha/sqrt(r));
                      a single file's `lora_adapter_metadata` (one LoraConfig per component prefix);
                      else the alpha keys (alpha / rank); else 1.
  intended_deltas     what the file means by its own format: PEFT folder -> its config; a single file
                      with `lora_adapter_metadata` and diffusers component-prefixed keys (modern or
                      legacy) -> the metadata; else `.alpha` / rank with alpha 0 meaning alpha = rank
                      (kohya); else 1.

A module is any down/up pair under one prefix, in every spelling loaders accept (see `parse_key`).
Modules with LyCORIS parts (lora_mid, hada_*, lokr_*) or a DoRA magnitude are not plain LoRAs:
the readers leave them out and `module_keys` lists them, for bit-for-bit pass-through checks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


class ReaderError(AssertionError):
    """The file cannot be read the way this loader family reads it (e.g. PEFT would refuse it)."""


# ---------------------------------------------------------------------------------------------
# Keys -> modules

_FACTOR = re.compile(
    r"^(?P<m>.+)\.(?P<tok>lora_up|lora_down|lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[A-Za-z_][A-Za-z0-9_]*))?(?:\.weight)?$"
)
_LEGACY = re.compile(r"^(?P<m>.+?)(?:\.lora_linear_layer|\.lora|_lora)\.(?P<tok>up|down)(?:\.weight)?$")
_UPDOWN = re.compile(r"^(?P<m>.+)\.(?P<tok>up|down)(?:\.weight)?$")
_ROLE = {"lora_up": "up", "lora_B": "up", "lora_embedding_B": "up", "up": "up",
         "lora_down": "down", "lora_A": "down", "lora_embedding_A": "down", "down": "down"}  # fmt: skip


def parse_key(key: str) -> tuple[str, str] | None:
    """(module, role) of a LoRA key, or None for a tensor that is no part of a LoRA module.

    Roles: up, down, mid, alpha, bias (lora_B.bias), dora, lycoris, embedding-up/-down, weak-up/-down
    (a bare up/down word: a module only when both halves are there)."""
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    if key.endswith(".dora_scale"):
        return key[: -len(".dora_scale")], "dora"
    m = re.match(r"^(.+)\.lora_magnitude_vector(?:\.[A-Za-z_]\w*)?(?:\.weight)?$", key)
    if m:
        return m.group(1), "dora"
    m = re.match(r"^(.+)\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$", key)
    if m:
        return m.group(1), "lycoris"
    m = re.match(r"^(.+)\.lora_mid(?:\.weight)?$", key)
    if m:
        return m.group(1), "mid"
    m = re.match(r"^(.+)\.lora_B(?:\.[A-Za-z_]\w*)?\.bias$", key)
    if m:
        return m.group(1), "bias"
    m = _FACTOR.match(key)
    if m and m.group("adapter") != "bias":  # "X.lora_A.weight" matches with adapter "weight"
        role = _ROLE[m.group("tok")]
        return m.group("m"), ("embedding-" + role) if "embedding" in m.group("tok") else role
    m = _LEGACY.match(key)
    if m:
        return m.group("m"), _ROLE[m.group("tok")]
    m = _UPDOWN.match(key)
    if m:
        return m.group("m"), "weak-" + _ROLE[m.group("tok")]
    return None


@dataclass
class ModuleKeys:
    name: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> key

    @property
    def plain(self) -> bool:
        """A plain LoRA pair (reducible in place): up and down, nothing LyCORIS or DoRA beside."""
        return "up" in self.keys and "down" in self.keys and not {"mid", "dora", "lycoris"} & set(self.keys)

    @property
    def embedding(self) -> bool:
        return self.keys.get("_embedding") == "1"


def module_keys(keys: list[str]) -> tuple[dict[str, ModuleKeys], list[str]]:
    """Modules in file order (plain ones and LyCORIS/DoRA ones), and the keys of every other tensor."""
    modules: dict[str, ModuleKeys] = {}
    lycoris_parts: dict[str, list[str]] = {}
    other: list[str] = []
    weak: dict[str, dict[str, str]] = {}
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            other.append(key)
            continue
        name, role = parsed
        if role.startswith("weak-"):
            weak.setdefault(name, {})[role[5:]] = key
            continue
        mk = modules.setdefault(name, ModuleKeys(name))
        if role.startswith("embedding-"):
            role = role[len("embedding-"):]
            mk.keys["_embedding"] = "1"
        if role == "lycoris":
            lycoris_parts.setdefault(name, []).append(key)
            mk.keys.setdefault("lycoris", key)
            continue
        mk.keys[role] = key
    for name, pair in weak.items():
        if {"up", "down"} <= set(pair):
            mk = modules.setdefault(name, ModuleKeys(name))
            mk.keys.update(pair)
        else:
            other.extend(pair.values())
    for name in [n for n, mk in modules.items() if set(mk.keys) <= {"alpha", "_embedding"}]:
        other.append(modules.pop(name).keys["alpha"])  # a lone alpha is no module
    for name, parts in lycoris_parts.items():
        modules[name].keys["_lycoris_keys"] = ",".join(parts)
    return modules, other


def all_module_key_list(mk: ModuleKeys) -> list[str]:
    out = [k for r, k in mk.keys.items() if not r.startswith("_") and r != "lycoris"]
    out += mk.keys.get("_lycoris_keys", "").split(",") if "_lycoris_keys" in mk.keys else []
    return out


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class LoraFile:
    weights: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    peft_config: dict | None  # adapter_config.json for a PEFT folder

    @property
    def diffusers_configs(self) -> dict[str, dict]:
        """lora_adapter_metadata: {component: LoraConfig dict} (keys were flattened as "unet.r")."""
        raw = self.metadata.get("lora_adapter_metadata")
        if self.peft_config is not None or not raw:
            return {}
        out: dict[str, dict] = {}
        for key, value in json.loads(raw).items():
            comp, _, fld = key.partition(".")
            out.setdefault(comp, {})[fld] = value
        return out


def open_file(path: str | Path) -> LoraFile:
    path = Path(path)
    config = None
    weights = path
    if path.is_dir():
        weights = path / PEFT_WEIGHTS
        config = json.loads((path / PEFT_CONFIG).read_text())
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    return LoraFile(weights, tensors, metadata, config)


def key_order(path: str | Path) -> list[str]:
    """Tensor keys in the order the header lists them (safetensors sorts by data offset)."""
    path = Path(path)
    weights = path / PEFT_WEIGHTS if path.is_dir() else path
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def plain_modules(lf: LoraFile) -> dict[str, ModuleKeys]:
    modules, _ = module_keys(key_order_from(lf))
    return {n: m for n, m in modules.items() if m.plain}


def key_order_from(lf: LoraFile) -> list[str]:
    return key_order(lf.weights)


def rank_of(lf: LoraFile, mk: ModuleKeys) -> int:
    return lf.tensors[mk.keys["down"]].shape[0]


def raw_delta(lf: LoraFile, mk: ModuleKeys) -> torch.Tensor:
    """up @ down in float64 (out x in_flat), or (B @ A)^T for an embedding LoRA; no scale."""
    up = lf.tensors[mk.keys["up"]].to(torch.float64)
    down = lf.tensors[mk.keys["down"]].to(torch.float64)
    r = down.shape[0]
    d = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return d.T.contiguous() if mk.embedding else d


def alpha_of(lf: LoraFile, mk: ModuleKeys) -> float | None:
    return float(lf.tensors[mk.keys["alpha"]].to(torch.float64)) if "alpha" in mk.keys else None


# ---------------------------------------------------------------------------------------------
# Scale rules


def pattern_value(patterns: dict | None, path: str):
    """PEFT >= 0.15 get_pattern_key: the first key (dict order) with re.match(rf"(.*\\.)?({key})$", path)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def peft_rank_alpha(config: dict, path: str) -> tuple[int, float]:
    r = pattern_value(config.get("rank_pattern"), path)
    r = config.get("r", 8) if r is None else r
    alpha = pattern_value(config.get("alpha_pattern"), path)
    alpha = config.get("lora_alpha", 8) if alpha is None else alpha
    return int(r), float(alpha)


def peft_scale(config: dict, path: str, rank: int, where: str) -> float:
    r, alpha = peft_rank_alpha(config, path)
    if r != rank:
        raise ReaderError(f"{where}: the config says rank {r} for {path}, its tensors have rank {rank} "
                          "(PEFT refuses to load a size mismatch)")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def component(name: str) -> str:
    head, dot, _ = name.partition(".")
    return head if dot and head in COMPONENTS else ""


def config_path(name: str) -> str:
    """The module path PEFT matches patterns against, for a diffusers single-file module name."""
    comp = component(name)
    path = name[len(comp) + 1 :] if comp else name
    path = path.replace(".processor.", ".")  # legacy attention-processor names
    if path.endswith(".to_out"):
        path += ".0"
    return path


def _tensor_scale(lf: LoraFile, mk: ModuleKeys) -> float:
    alpha = alpha_of(lf, mk)
    return 1.0 if alpha is None else alpha / rank_of(lf, mk)


def _metadata_scale(lf: LoraFile, mk: ModuleKeys) -> float:
    rank = rank_of(lf, mk)
    if lf.peft_config is not None:
        return peft_scale(lf.peft_config, mk.name.removeprefix(PEFT_PREFIX), rank, str(lf.weights))
    config = lf.diffusers_configs.get(component(mk.name))
    if config is not None:
        return peft_scale(config, config_path(mk.name), rank, f"{lf.weights} lora_adapter_metadata")
    return _tensor_scale(lf, mk)


def _intended_scale(lf: LoraFile, mk: ModuleKeys) -> float:
    if lf.peft_config is not None or lf.diffusers_configs.get(component(mk.name)) is not None:
        return _metadata_scale(lf, mk)
    alpha = alpha_of(lf, mk)
    if alpha is None or alpha == 0.0:
        return 1.0
    return alpha / rank_of(lf, mk)


def _deltas(path: str | Path, rule) -> dict[str, torch.Tensor]:
    lf = open_file(path)
    return {name: rule(lf, mk) * raw_delta(lf, mk) for name, mk in plain_modules(lf).items()}


def tensor_only_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """ComfyUI / A1111 / Forge on a single file: alpha / rank where an alpha key exists, else 1."""
    if Path(path).is_dir():
        raise ReaderError(f"{path}: tensor-only loaders read single files, not PEFT folders")
    return _deltas(path, _tensor_scale)


def metadata_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: config or lora_adapter_metadata, else alpha keys, else 1."""
    return _deltas(path, _metadata_scale)


def intended_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's own format: config / diffusers metadata, else alpha (0 = rank), else 1."""
    return _deltas(path, _intended_scale)


def scales(path: str | Path) -> dict[str, dict[str, float | None]]:
    """{module: {"tensor": s, "metadata": s, "intended": s}} (tensor None for a PEFT folder)."""
    lf = open_file(path)
    out = {}
    for name, mk in plain_modules(lf).items():
        out[name] = {"tensor": None if lf.peft_config is not None else _tensor_scale(lf, mk),
                     "metadata": _metadata_scale(lf, mk), "intended": _intended_scale(lf, mk)}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The oracle


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a dense float64 matrix. A tall (or wide) one is first reduced by an exact Householder
    QR (Q R, then the SVD of the small R): the same decomposition, far faster for 21504 x 8."""
    d = delta.to(torch.float64)
    m, n = d.shape
    if m > 4 * n:
        q, r = torch.linalg.qr(d)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        return q @ u, s, vh
    if n > 4 * m:
        u, s, vh = svd(d.T)
        return vh.T, s, u.T
    return torch.linalg.svd(d, full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> torch.Tensor:
    return (u[:, :k] * s[:k]) @ vh[:k]


def svd_truncate(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank-k approximation, singular values) by a dense float64 SVD."""
    u, s, vh = svd(delta)
    return truncate(u, s, vh, k), s


def fro_rank(s: torch.Tensor, p: float, cap: int) -> int:
    """Smallest k (1..cap) whose retained Frobenius ratio sqrt(sum_{i<k} s_i^2 / sum s^2) >= p."""
    energy = s.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 1
    kept = torch.sqrt(torch.cumsum(energy, 0) / total)
    for k in range(1, cap + 1):
        if float(kept[k - 1]) >= p - 1e-12:
            return k
    return cap


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F (0 when both vanish)."""
    nb = float(b.norm())
    diff = float((a - b).norm())
    return diff / nb if nb > 0 else diff
