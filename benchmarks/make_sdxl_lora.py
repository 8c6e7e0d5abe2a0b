"""Write a realistic kohya SDXL LoRA for benchmarks (reference/kohya_resize.md section 4).

986 Linear modules, SGM names as sd-scripts writes them for SDXL:
  722 UNet: 70 transformer blocks x 10 (attn1 q/k/v/out, attn2 q/k/v/out with 2048-wide context
            for k/v, ff.net.0.proj dim -> 8*dim (GEGLU), ff.net.2 4*dim -> dim) + 11 proj_in/proj_out pairs
   72 lora_te1 (CLIP-L: 12 layers x q/k/v/out_proj/fc1/fc2, 768 wide)
  192 lora_te2 (OpenCLIP bigG: 32 layers x 6, 1280 wide)
Rank 128, alpha 64, fp16, ss_* metadata and sshs hashes: 912 MB, like the reference file.

Each module's update up.down = Qb.diag(s).Qa^T (hidden behind a random rotation, so neither factor
is orthonormal) with a seeded random spectrum: a power law or an exponential, plus a noise floor.
The spectra are written beside the file as <name>.spectra.json.

Streaming: the header is known from the shapes alone, so it is written first and each module's
tensors are generated and written in turn; only one module is ever in memory.

    python benchmarks/make_sdxl_lora.py OUT.safetensors [--limit N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

RANK, ALPHA = 128, 64.0
CONTEXT = 2048  # SDXL cross-attention width (CLIP-L 768 + bigG 1280)
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000  # sshs_legacy_hash: 64 KiB at 1 MiB
HASH_PLACEHOLDER = "0" * 64  # same length as the final value, so the header size never changes

# (SGM container, channels, transformer depth): input 4,5 / 7,8, middle, output 0-2 / 3-5
UNET_CONTAINERS = [
    ("input_blocks_4_1", 640, 2), ("input_blocks_5_1", 640, 2),
    ("input_blocks_7_1", 1280, 10), ("input_blocks_8_1", 1280, 10),
    ("middle_block_1", 1280, 10),
    ("output_blocks_0_1", 1280, 10), ("output_blocks_1_1", 1280, 10), ("output_blocks_2_1", 1280, 10),
    ("output_blocks_3_1", 640, 2), ("output_blocks_4_1", 640, 2), ("output_blocks_5_1", 640, 2),
]  # fmt: skip


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # kohya module name, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    out_features: int
    in_features: int


def transformer_block(prefix: str, dim: int) -> list[ModuleSpec]:
    specs = [ModuleSpec(f"{prefix}_attn1_to_{p}", dim, dim) for p in ("q", "k", "v", "out_0")]
    specs += [ModuleSpec(f"{prefix}_attn2_to_q", dim, dim), ModuleSpec(f"{prefix}_attn2_to_k", dim, CONTEXT),
              ModuleSpec(f"{prefix}_attn2_to_v", dim, CONTEXT), ModuleSpec(f"{prefix}_attn2_to_out_0", dim, dim)]
    specs += [ModuleSpec(f"{prefix}_ff_net_0_proj", 8 * dim, dim), ModuleSpec(f"{prefix}_ff_net_2", dim, 4 * dim)]
    return specs  # fmt: skip


def unet_modules() -> list[ModuleSpec]:
    specs = []
    for container, dim, depth in UNET_CONTAINERS:
        base = f"lora_unet_{container}"
        specs += [ModuleSpec(f"{base}_proj_in", dim, dim), ModuleSpec(f"{base}_proj_out", dim, dim)]
        for i in range(depth):
            specs += transformer_block(f"{base}_transformer_blocks_{i}", dim)
    return specs


def text_encoder_modules(prefix: str, layers: int, dim: int) -> list[ModuleSpec]:
    specs = []
    for i in range(layers):
        base = f"{prefix}_text_model_encoder_layers_{i}"
        specs += [ModuleSpec(f"{base}_self_attn_{p}_proj", dim, dim) for p in ("q", "k", "v", "out")]
        specs += [ModuleSpec(f"{base}_mlp_fc1", 4 * dim, dim), ModuleSpec(f"{base}_mlp_fc2", dim, 4 * dim)]
    return specs


def sdxl_modules() -> list[ModuleSpec]:
    """All 986 modules, sorted by name (the order safetensors' own writer uses)."""
    specs = unet_modules() + text_encoder_modules("lora_te1", 12, 768) + text_encoder_modules("lora_te2", 32, 1280)
    return sorted(specs, key=lambda s: s.name)


def pick(specs: list[ModuleSpec], limit: int | None) -> list[ModuleSpec]:
    """Every k-th module, so a small fixture still covers every shape family."""
    if limit is None or limit >= len(specs):
        return specs
    step = len(specs) / limit
    return [specs[int(i * step)] for i in range(limit)]


# ---------------------------------------------------------------------------------------------
# Spectra and factors


def module_generator(name: str, seed: int) -> torch.Generator:
    """Per-module stream: a module's content does not depend on --limit or on the other modules."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_spectrum(gen: torch.Generator, rank: int) -> tuple[torch.Tensor, dict]:
    """Half power law s_i = (i+1)^-p, half exponential exp(-i/tau); a floor of 0.2-2 % of s_0.

    The ranges (p in 0.2..1.6, tau log-uniform in 0.8..120) were tuned so kohya's sv_fro 0.9 / cap 64
    rank histogram on this file resembles the one measured on the reference file (mean 22.5, median 12,
    about 120 modules at the cap)."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    i = torch.arange(rank, dtype=torch.float64)
    if u[0] < 0.5:
        kind, shape = "power", 0.2 + 1.4 * u[1]
        s = (i + 1) ** -shape
    else:
        kind, shape = "exp", math.exp(math.log(0.8) + u[1] * math.log(120 / 0.8))
        s = torch.exp(-i / shape)
    floor = 0.002 * 10 ** u[2]
    s = (s + floor * torch.rand(rank, generator=gen, dtype=torch.float64)).sort(descending=True).values
    s = s * (0.5 + 1.5 * u[3])  # overall strength varies per module
    return s, {"kind": kind, "shape": shape, "floor": floor}


def planted_factors(spec: ModuleSpec, s: torch.Tensor, gen: torch.Generator, rank: int):
    """(up, down) with scale.up.down = Qb.diag(s).Qa^T; sqrt(s) on each side, like trained factors."""
    qb, _ = torch.linalg.qr(torch.randn(spec.out_features, rank, generator=gen))
    qa, _ = torch.linalg.qr(torch.randn(spec.in_features, rank, generator=gen))
    rot, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen))
    root = (s / (ALPHA / rank)).sqrt().float()  # undo the scale the loader will apply
    up = (qb * root) @ rot
    down = rot.T @ (qa * root).T
    return up, down


# ---------------------------------------------------------------------------------------------
# The file


def tensor_entries(specs: list[ModuleSpec], rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every key and shape in data order: per module .alpha, .lora_down.weight, .lora_up.weight."""
    entries = []
    for spec in specs:
        entries.append((f"{spec.name}.alpha", ()))
        entries.append((f"{spec.name}.lora_down.weight", (rank, spec.in_features)))
        entries.append((f"{spec.name}.lora_up.weight", (spec.out_features, rank)))
    return entries


def metadata(specs: list[ModuleSpec], rank: int) -> dict[str, str]:
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(ALPHA),
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_output_name": "sdxl_r128",
        "ss_sd_model_name": "sd_xl_base_1.0.safetensors", "ss_resolution": "(1024, 1024)",
        "ss_network_args": "{}", "ss_training_comment": f"lorad benchmark fixture, {len(specs)} modules",
        "ss_tag_frequency": json.dumps({"img": {"photo": 120, "portrait": 64, "outdoors": 17}}),
        "sshs_model_hash": HASH_PLACEHOLDER, "sshs_legacy_hash": HASH_PLACEHOLDER[:8],
    }  # fmt: skip


def header_bytes(entries: list[tuple[str, tuple[int, ...]]], meta: dict[str, str]) -> bytes:
    doc: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name, shape in entries:
        size = math.prod(shape) * 2  # F16
        doc[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data section 8-byte aligned


def write_lora(path: Path, specs: list[ModuleSpec], seed: int, rank: int = RANK) -> dict:
    """Stream the file to `path`; return the spectra record. Hashes are patched in at the end."""
    meta = metadata(specs, rank)
    head = header_bytes(tensor_entries(specs, rank), meta)
    data_hash, spectra = hashlib.sha256(), {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for spec in specs:
            gen = module_generator(spec.name, seed)
            s, params = random_spectrum(gen, rank)
            up, down = planted_factors(spec, s, gen, rank)
            for t in (torch.tensor(ALPHA), down, up):
                chunk = t.to(torch.float16).contiguous().numpy().tobytes()
                data_hash.update(chunk)
                f.write(chunk)
            spectra[spec.name] = {**params, "s": [round(x, 7) for x in s.tolist()]}
    patch_hashes(path, head, meta, data_hash.hexdigest())
    return spectra


def patch_hashes(path: Path, head: bytes, meta: dict[str, str], model_hash: str) -> None:
    """Fill in sshs_model_hash (data sha256) and sshs_legacy_hash (64 KiB at 1 MiB), same lengths."""
    with open(path, "r+b") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
        fixed = head.replace(f'"sshs_model_hash":"{HASH_PLACEHOLDER}"'.encode(),
                             f'"sshs_model_hash":"{model_hash}"'.encode())
        fixed = fixed.replace(f'"sshs_legacy_hash":"{HASH_PLACEHOLDER[:8]}"'.encode(),
                              f'"sshs_legacy_hash":"{legacy}"'.encode())  # fmt: skip
        assert len(fixed) == len(head)
        f.seek(8)
        f.write(fixed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--limit", type=int, help="only N modules, spread over every shape (small fixtures)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    specs = pick(sdxl_modules(), args.limit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spectra = write_lora(args.output, specs, args.seed)
    Path(str(args.output) + ".spectra.json").write_text(json.dumps(spectra))
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {len(specs)} modules, {size:,} B in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
