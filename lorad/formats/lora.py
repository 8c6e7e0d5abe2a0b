"""Open a LoRA (a .safetensors file or a PEFT adapter directory) as validated modules.

Nothing here loads the factor tensors: `open_lora` reads the header, the alphas and the config, and
decides per module what it is, its shape, its scale and whether it can be reduced. The engine then
streams the factors module by module through `Reader`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorad._fileio import open_regular
from lorad.errors import FormatError
from lorad.formats import detect
from lorad.formats.keys import parse_key
from lorad.formats.safetensors_file import Header, read_header, read_raw

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# diffusers' kohya converter stores alphas as int64
_SCALAR_DTYPES = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32}

_SKIP_REASONS = {
    "loha": "LoHa (Hadamard product) is not SVD-reducible in place; passed through (--convert-lycoris rebuilds it)",
    "lokr": "LoKr (Kronecker product) is not SVD-reducible in place; passed through (--convert-lycoris rebuilds it)",
    "tucker": "Tucker LoCon (lora_mid) core; passed through unchanged",
    "dora": "DoRA magnitude rescales the normalised weight; reducing would change the result, passed through",
}


@dataclass(frozen=True)
class Module:
    name: str  # the key prefix, exactly as the file spells it
    kind: str  # linear | conv1x1 | conv3x3 (any kxk) | loha | lokr | tucker | dora | lora-kernel-up
    keys: dict[str, str]  # role -> tensor key
    out_features: int
    in_features: int  # flattened: in_channels * kh * kw
    rank: int
    kernel: tuple[int, ...]  # () for Linear, (kh, kw) for conv
    dtype: str  # safetensors dtype of the up factor
    scale: float  # what loaders multiply up @ down by
    skip: str | None = None

    @property
    def reducible(self) -> bool:
        return self.skip is None

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """The shape of a down factor of `rank` rows, in this module's layout."""
        if not self.kernel:
            return (rank, self.in_features)
        return (rank, self.in_features // _prod(self.kernel), *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, 1, 1) if self.kernel else (self.out_features, rank)

    def params(self, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        return r * (self.out_features + self.in_features)


@dataclass(frozen=True)
class LoraSource:
    path: Path  # what the user gave: a file or a PEFT directory
    weights: Path  # the safetensors file holding the tensors
    header: Header
    format: str
    style: str  # detect.ALPHA_KEYS | DIFFUSERS_METADATA | PEFT_CONFIG | SCALE_ONE
    modules: tuple[Module, ...]
    passthrough: tuple[str, ...]  # keys copied bit for bit (non-LoRA tensors, skipped modules)
    peft_config: dict[str, Any] | None = None

    @property
    def reducible(self) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if m.reducible)


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def open_lora(path: str | Path) -> LoraSource:
    path = Path(path)
    peft_config = None
    weights = path
    if path.is_dir():
        peft_config, weights = _peft_dir(path)
    elif not path.exists():
        raise FormatError(f"{path}: no such file")
    header = read_header(weights)
    fmt = detect.detect_format(header.tensors, header.metadata, is_peft_dir=peft_config is not None)
    groups, passthrough = _group_keys(header)
    has_alpha = any("alpha" in roles for roles in groups.values())
    style = detect.scale_style(fmt, has_alpha)
    scales = _ScaleRules(weights, header, fmt, peft_config)
    modules = [_module(weights, header, name, roles, scales) for name, roles in groups.items()]
    if not modules:
        raise FormatError(
            f"{path}: no LoRA modules found (no lora_up/lora_down or lora_A/lora_B pairs); "
            "is this a full checkpoint rather than a LoRA?"
        )
    for m in modules:
        if not m.reducible:
            passthrough.extend(m.keys.values())
    return LoraSource(path, weights, header, fmt, style, tuple(modules), tuple(passthrough), peft_config)


def _peft_dir(path: Path) -> tuple[dict[str, Any], Path]:
    cfg_path, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise FormatError(f"{path}: a directory, but not a PEFT adapter (no {PEFT_CONFIG})")
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise FormatError(f"{path}: adapter_model.bin is a pickle; lorad never unpickles (save with safetensors)")
        raise FormatError(f"{path}: PEFT adapter without {PEFT_WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: unreadable adapter config: {e}") from e
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise FormatError(f"{cfg_path}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    return config, weights


def _group_keys(header: Header) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Module name -> {role: key} for LoRA keys; the rest are pass-through keys."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    passthrough: list[str] = []
    for key in header.tensors:
        kr = parse_key(key)
        if kr is None:
            passthrough.append(key)
        else:
            groups[kr.module][kr.role] = key
    lora_groups = {}
    for name, roles in groups.items():
        if set(roles) <= {"alpha", "scale"}:  # an alpha without factors: not a module of ours
            passthrough.extend(roles.values())
        else:
            lora_groups[name] = dict(roles)
    return lora_groups, passthrough


def _module(weights: Path, header: Header, name: str, roles: dict[str, str], scales: "_ScaleRules") -> Module:
    kind = _lycoris_kind(roles)
    if kind is None and ("up" not in roles or "down" not in roles):
        have = "up" if "up" in roles else "down"
        raise FormatError(f"{weights}: module {name!r} has a {have} factor but no matching "
                          f"{'down' if have == 'up' else 'up'} factor")
    if kind is not None:
        first = header.tensors[next(iter(roles.values()))]
        return Module(name, kind, roles, 0, 0, 0, (), first.dtype, 1.0, _SKIP_REASONS[kind])
    up, down = header.tensors[roles["up"]], header.tensors[roles["down"]]
    for t in (up, down):
        if t.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{weights}: {t.name!r} has dtype {t.dtype}; LoRA factors must be floating point")
    if len(up.shape) not in (2, 4) or len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        raise FormatError(f"{weights}: module {name!r}: up {list(up.shape)} and down {list(down.shape)} "
                          "are not a Linear or Conv LoRA pair")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise FormatError(f"{weights}: module {name!r}: mismatched shapes, up {list(up.shape)} vs "
                          f"down {list(down.shape)} (rank {up.shape[1]} != {rank})")
    kernel = tuple(down.shape[2:])
    in_features = _prod(down.shape[1:])
    scale = scales.scale(name, roles, rank)
    if len(up.shape) == 4 and tuple(up.shape[2:]) != (1, 1):
        return Module(name, "lora-kernel-up", roles, up.shape[0], in_features, rank, kernel, up.dtype, scale,
                      "up factor has a spatial kernel; dW is not up @ down, passed through")
    kind = "linear" if not kernel else f"conv{kernel[0]}x{kernel[1]}"
    return Module(name, kind, roles, up.shape[0], in_features, rank, kernel, up.dtype, scale)


def _lycoris_kind(roles: dict[str, str]) -> str | None:
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "mid" in roles:
        return "tucker"
    if "dora" in roles:
        return "dora"
    return None


class _ScaleRules:
    """Each format's rule for the scale loaders apply to up @ down (reference/formats.md §1)."""

    def __init__(self, weights: Path, header: Header, fmt: str, peft_config: dict[str, Any] | None):
        self.weights, self.header, self.fmt = weights, header, fmt
        self.configs: dict[str, dict[str, Any]] = {}
        if peft_config is not None:
            self.configs[""] = peft_config
        elif fmt == "diffusers" and DIFFUSERS_METADATA_KEY in header.metadata:
            self.configs = _diffusers_configs(weights, header.metadata[DIFFUSERS_METADATA_KEY])

    def scale(self, name: str, roles: dict[str, str], rank: int) -> float:
        config = self._config_for(name)
        if config is not None:
            return _config_scale(config, _config_module_name(name, self.fmt), rank)
        if "alpha" in roles:
            alpha = self._alpha(roles["alpha"])
            return 1.0 if alpha == 0 else alpha / rank  # kohya: alpha 0 means alpha = rank
        return 1.0

    def _config_for(self, name: str) -> dict[str, Any] | None:
        if "" in self.configs:
            return self.configs[""]
        return self.configs.get(detect.diffusers_prefix(name))

    def _alpha(self, key: str) -> float:
        return read_scalar(self.header, key)


def read_scalar(header: Header, key: str) -> float:
    """A 0-d (or 1-element) tensor such as an alpha, as a finite float."""
    entry = header.tensors[key]
    if entry.shape not in ((), (1,)) or entry.dtype not in _SCALAR_DTYPES:
        raise FormatError(f"{header.path}: {key!r} is {entry.dtype} {list(entry.shape)}, expected a scalar")
    value = float(torch.frombuffer(bytearray(read_raw(header, key)), dtype=_SCALAR_DTYPES[entry.dtype])[0])
    if not math.isfinite(value):
        raise FormatError(f"{header.path}: {key!r} is {value}")
    return value


def _diffusers_configs(weights: Path, raw: str) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` holds one LoraConfig per component, flattened as "unet.r", ..."""
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{weights}: lora_adapter_metadata is not JSON: {e}") from e
    configs: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in (flat or {}).items():
        prefix, _, field = key.partition(".")
        if field:
            configs[prefix][field] = value
    return dict(configs)


def _config_module_name(name: str, fmt: str) -> str:
    """The module path PEFT patterns are matched against."""
    if name.startswith("base_model.model."):
        return name[len("base_model.model."):]
    if fmt == "diffusers":
        return name.partition(".")[2]
    return name


def _pattern_value(patterns: dict[str, Any] | None, module: str) -> Any:
    # PEFT >= 0.15 matches a pattern key against the full module path like this.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _config_scale(config: dict[str, Any], module: str, rank: int) -> float:
    # PEFT scales by lora_alpha / r (sqrt(r) with rsLoRA). A config r that disagrees with the
    # tensor cannot load in PEFT at all, so the tensor's own rank is the one that counts.
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)  # PEFT's default
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def most_common(values: list[Any], default: Any) -> Any:
    return Counter(values).most_common(1)[0][0] if values else default


class Reader:
    """Reads tensors with pread, not mmap: the input's pages never count as the process's memory,
    which matters when the file is larger than what its reduction needs."""

    def __init__(self, source: LoraSource | Header):
        self.header = source.header if isinstance(source, LoraSource) else source
        self._file = open_regular(self.header.path)
        self._fd = self._file.fileno()

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.header.tensors[key]
        dtype = FLOAT_DTYPES.get(entry.dtype)
        if dtype is None:
            raise FormatError(f"{self.header.path}: {key!r} has dtype {entry.dtype}, expected floating point")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        buf = bytearray(entry.nbytes)
        view, offset, got = memoryview(buf), self.header.data_offset + entry.start, 0
        while got < entry.nbytes:
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n == 0:
                raise FormatError(f"{self.header.path}: truncated while reading {key!r}")
            got += n
        return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)

    def factors(self, module: Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in_flat)) as stored (the caller picks the compute dtype)."""
        up = self.tensor(module.keys["up"]).reshape(module.out_features, module.rank)
        down = self.tensor(module.keys["down"]).reshape(module.rank, module.in_features)
        return up, down

    def check_finite(self, modules: list[Module]) -> None:
        """Name the first factor holding NaN or Inf (the slow path, after a batch's spectrum was)."""
        for m in modules:
            for role in ("up", "down"):
                if not torch.isfinite(self.tensor(m.keys[role])).all():
                    raise FormatError(f"{self.header.path}: tensor {m.keys[role]!r} contains NaN or Inf values")

    def close(self) -> None:
        if self._fd >= 0:
            self._file.close()
            self._fd = -1

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
