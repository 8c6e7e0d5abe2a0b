"""Open a LoRA (a .safetensors file or a PEFT adapter directory) as validated modules.

Nothing here loads the factor tensors: `open_lora` reads the header, the alphas and the config, and
decides per module what it is, its shape, its scale and whether it can be reduced. The engine then
streams the factors module by module through `Reader`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorad._fileio import open_regular
from lorad.engine.formats import detect
from lorad.engine.formats.keys import Group, group_keys
from lorad.engine.formats.safetensors_file import Header, read_header, read_raw
from lorad.engine.formats.scales import DIFFUSERS_METADATA_KEY, Readings, ScaleRules
from lorad.errors import FormatError

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# diffusers' kohya converter stores alphas as int64
_SCALAR_DTYPES = {**FLOAT_DTYPES, "I64": torch.int64, "I32": torch.int32}

_SKIP_REASONS = {
    "loha": "LoHa (Hadamard product) is not SVD-reducible in place; passed through (--convert-lycoris rebuilds it)",
    "lokr": "LoKr (Kronecker product) is not SVD-reducible in place; passed through (--convert-lycoris rebuilds it)",
    "tucker": "Tucker LoCon (lora_mid) core; passed through unchanged",
    "dora": "DoRA magnitude rescales the normalised weight; reducing would change the result, passed through",
    "scale": "has an explicit .scale key, which only A1111 reads (as the whole scale); passed through",
}


@dataclass(frozen=True)
class Module:
    name: str  # the key prefix, exactly as the file spells it
    kind: str  # linear | conv1x1 | conv3x3 | conv3x3x3 (any kernel) | embedding | loha | lokr | tucker | dora | ...
    keys: dict[str, str]  # role -> tensor key
    out_features: int
    in_features: int  # flattened: in_channels * prod(kernel)
    rank: int
    kernel: tuple[int, ...]  # () for Linear and Embedding, the spatial dims for conv (2-D, 3-D...)
    dtype: str  # safetensors dtype of the up factor
    scale: float  # what the file's own format multiplies up @ down by (its intended strength)
    skip: str | None = None
    readings: Readings | None = None  # the scale as each loader family reads it
    alpha: float | None = None  # the module's .alpha value, if it has one

    @property
    def reducible(self) -> bool:
        return self.skip is None

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """The shape of a down factor of `rank` rows, in this module's layout."""
        if not self.kernel:
            return (rank, self.in_features)
        return (rank, self.in_features // math.prod(self.kernel), *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, *(1,) * len(self.kernel))

    def params(self, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        return r * (self.out_features + self.in_features)


@dataclass(frozen=True)
class LoraSource:
    path: Path  # what the user gave: a file or a PEFT directory
    weights: Path  # the safetensors file holding the tensors
    header: Header
    format: str
    style: str  # detect.ALPHA_KEYS | detect.PEFT_CONFIG | detect.SCALE_ONE
    modules: tuple[Module, ...]
    passthrough: tuple[str, ...]  # keys copied bit for bit (non-LoRA tensors, skipped modules)
    peft_config: dict[str, Any] | None = None
    diffusers_metadata: bool = False  # the file carries lora_adapter_metadata
    notes: tuple[str, ...] = ()  # what a user should know about how loaders read the input

    @property
    def reducible(self) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if m.reducible)

    @property
    def writes_diffusers_metadata(self) -> bool:
        """Minimal metadata is written where the input had it, and for diffusers-format files
        without alpha keys (it pins each module's rank and scale for diffusers 0.34-0.39)."""
        return self.peft_config is None and (
            self.diffusers_metadata or (self.format == "diffusers" and self.style == detect.SCALE_ONE)
        )


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
    try:
        groups, passthrough = group_keys(header.tensors)
    except FormatError as e:
        raise FormatError(f"{weights}: {e}") from None
    rules = ScaleRules(str(weights), header.metadata, peft_config)
    modules = []
    for name, group in groups.items():
        m = _module(weights, header, name, group, rules)
        if m is None:  # a weak up/down pair that is not a LoRA pair after all
            passthrough.extend(group.roles.values())
        else:
            modules.append(m)
    if not modules:
        raise FormatError(
            f"{path}: no LoRA modules found (no lora_up/lora_down, lora_A/lora_B or up/down pairs); "
            "is this a full checkpoint rather than a LoRA?"
        )
    for m in modules:
        if not m.reducible:
            passthrough.extend(m.keys.values())
    has_metadata = peft_config is None and DIFFUSERS_METADATA_KEY in header.metadata
    style = _style(fmt, has_metadata, modules)
    notes = _disagreement_notes(modules, peft_config is not None, has_metadata)
    passthrough = sorted(set(passthrough), key=lambda k: header.tensors[k].start)
    return LoraSource(path, weights, header, fmt, style, tuple(modules), tuple(passthrough), peft_config,
                      has_metadata, notes)


def _style(fmt: str, has_metadata: bool, modules: list[Module]) -> str:
    if fmt == "peft":
        return detect.PEFT_CONFIG
    # kohya files get alpha keys even without them: diffusers < 0.40 mis-scales mixed ranks
    # without alphas, and every kohya loader reads one constant alpha right.
    if not has_metadata and (fmt.startswith("kohya") or any("alpha" in m.keys for m in modules if m.reducible)):
        return detect.ALPHA_KEYS
    # With metadata, diffusers reads the metadata and ComfyUI the alpha keys: only scale 1 in the
    # factors (alpha = rank where alpha keys exist) reads the same in both.
    return detect.SCALE_ONE


def _disagreement_notes(modules: list[Module], peft_dir: bool, has_metadata: bool) -> tuple[str, ...]:
    split = [m for m in modules if m.readings is not None and m.readings.disagree()]
    if not split:
        return ()
    m = split[0]
    source = "its lora_adapter_metadata (diffusers)" if has_metadata else "kohya's rule for alpha 0 (alpha = rank)"
    assert m.readings is not None
    return (
        f"loaders disagree on the input: {len(split)} of {len(modules)} modules are read at another strength "
        f"by tensor-only loaders (ComfyUI, A1111/Forge; e.g. {m.name}: {m.readings.tensors:.6g}) than by "
        f"{'diffusers' if has_metadata else 'kohya/diffusers'} ({m.readings.metadata:.6g}); lorad follows the "
        f"file's own format, {source}, and writes a file every loader reads at that strength",
    )


def _peft_dir(path: Path) -> tuple[dict[str, Any], Path]:
    cfg_path, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise FormatError(f"{path}: a directory, but not a PEFT adapter (no {PEFT_CONFIG})")
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise FormatError(f"{path}: adapter_model.bin is a pickle; lorad never unpickles (save with safetensors)")
        raise FormatError(f"{path}: PEFT adapter without {PEFT_WEIGHTS}")
    try:
        with open_regular(cfg_path) as f:
            config = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{cfg_path}: unreadable adapter config: {e}") from e
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise FormatError(f"{cfg_path}: not a LoRA adapter (peft_type={peft_type!r})")
    return config, weights


def _module(weights: Path, header: Header, name: str, group: Group, rules: ScaleRules) -> Module | None:
    roles = group.roles
    lycoris = _lycoris_kind(roles)
    alpha = read_scalar(header, roles["alpha"]) if "alpha" in roles else None
    if lycoris is not None and not {"up", "down"} <= set(roles):
        kind = lycoris
        first = header.tensors[next(iter(roles.values()))]
        return Module(name, kind, roles, 0, 0, 0, (), first.dtype, 1.0, _SKIP_REASONS[kind], alpha=alpha)
    if "up" not in roles or "down" not in roles:
        have = "up" if "up" in roles else "down"
        raise FormatError(f"{weights}: module {name!r} has a {have} factor but no matching "
                          f"{'down' if have == 'up' else 'up'} factor")
    up, down = header.tensors[roles["up"]], header.tensors[roles["down"]]
    shapes_ok = len(up.shape) == len(down.shape) >= 2 and up.shape[1] == down.shape[0]
    if group.weak and not (shapes_ok and up.dtype in FLOAT_DTYPES and down.dtype in FLOAT_DTYPES):
        return None
    for t in (up, down):
        if t.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{weights}: {t.name!r} has dtype {t.dtype}; LoRA factors must be floating point")
    if len(up.shape) < 2 or len(up.shape) != len(down.shape):
        raise FormatError(f"{weights}: module {name!r}: up {list(up.shape)} and down {list(down.shape)} "
                          "are not a Linear or Conv LoRA pair")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise FormatError(f"{weights}: module {name!r}: mismatched shapes, up {list(up.shape)} vs "
                          f"down {list(down.shape)} (rank {up.shape[1]} != {rank})")
    if rank == 0:
        raise FormatError(f"{weights}: module {name!r} has rank 0")
    kernel = tuple(down.shape[2:])
    in_features = math.prod(down.shape[1:])
    readings = rules.readings(name, rank, alpha)
    scale = rules.intended(readings)
    common = dict(keys=roles, out_features=up.shape[0], in_features=in_features, rank=rank, kernel=kernel,
                  dtype=up.dtype, scale=scale, readings=readings, alpha=alpha)
    if lycoris is not None:  # DoRA, Tucker: a LoRA's shapes, but not reducible in place
        return Module(name, lycoris, **common, skip=_SKIP_REASONS[lycoris])
    if any(d != 1 for d in up.shape[2:]):
        return Module(name, "lora-kernel-up", **common,
                      skip="up factor has a spatial kernel; dW is not up @ down, passed through")
    if "scale" in roles:
        return Module(name, "scaled", **common, skip=_SKIP_REASONS["scale"])
    if group.embedding:
        kind = "embedding"
    else:
        kind = "linear" if not kernel else "conv" + "x".join(map(str, kernel))
    return Module(name, kind, **common)


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


def read_scalar(header: Header, key: str) -> float:
    """A 0-d (or 1-element) tensor such as an alpha, as a finite float."""
    entry = header.tensors[key]
    if entry.shape not in ((), (1,)) or entry.dtype not in _SCALAR_DTYPES:
        raise FormatError(f"{header.path}: {key!r} is {entry.dtype} {list(entry.shape)}, expected a scalar")
    value = float(torch.frombuffer(bytearray(read_raw(header, key)), dtype=_SCALAR_DTYPES[entry.dtype])[0])
    if not math.isfinite(value):
        raise FormatError(f"{header.path}: {key!r} is {value}")
    return value


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
