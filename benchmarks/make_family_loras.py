"""Write realistic LoRAs for the big families, with their real module shapes and trainer key layouts.

  flux   Flux.1-dev, rank 32, kohya sd-scripts `networks.lora_flux` (BFL module names):
         19 double blocks x {img,txt}_{attn_qkv (fused q/k/v, 3072 -> 9216), attn_proj, mlp_0 (3072 ->
         12288), mlp_2, mod_lin (3072 -> 18432)} + 38 single blocks x {linear1 (fused qkv + mlp,
         3072 -> 21504), linear2 (15360 -> 3072), modulation_lin (3072 -> 9216)} = 304 modules.
         Keys lora_unet_double_blocks_0_img_attn_qkv.{lora_down,lora_up}.weight and .alpha;
         bf16, alpha 16; ss_* metadata (networks.lora_flux, flux1) and sshs hashes.
  qwen   Qwen-Image, rank 64, ai-toolkit layout (diffusers module names under `diffusion_model.`, PEFT
         lora_A/lora_B, no alpha, so loaders apply scale 1): 60 transformer blocks x 14 Linear =
         840 modules (attn to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out 3072 x 3072; img_mlp/txt_mlp
         net.0.proj 3072 -> 12288 and net.2 12288 -> 3072; img_mod.1/txt_mod.1 3072 -> 18432), bf16.
  wan    Wan 2.1 T2V 14B, rank 32, musubi-tuner `networks.lora_wan` (Wan's own module names): 40
         blocks x {self_attn, cross_attn} x {q, k, v, o} (5120 x 5120) + ffn_0 (5120 -> 13824) and
         ffn_2 (13824 -> 5120) = 400 modules. Keys lora_unet_blocks_0_self_attn_q.lora_down.weight
         and .alpha; bf16, alpha 16; ss_* metadata (networks.lora_wan) and sshs hashes.

Shapes come from the model classes' default configs (diffusers FluxTransformer2DModel,
QwenImageTransformer2DModel, WanTransformer3DModel with the 14B config) and the trainers'
target/exclude rules (musubi excludes norms/embeddings for Wan; ai-toolkit trains every Linear of
the Qwen blocks, modulation included).

Each module's update scale * up @ down = Qb diag(s) Qa^T is hidden behind a random rotation, with
a seeded spectrum per module: a power law or an exponential decay, plus a noise floor, at a
per-module strength, so `fro 0.9` picks mixed ranks. Files are streamed: the header is written
first, then each module's tensors in turn (one module in memory at a time).

    python benchmarks/make_family_loras.py [--only flux|qwen|wan] [--out DIR] [--seed S]
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

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000  # sshs_legacy_hash: 64 KiB at 1 MiB
HASH_PLACEHOLDER = "0" * 64  # same length as the final hash, so the header never changes size
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # module key prefix as the trainer writes it
    out_features: int
    in_features: int


@dataclass(frozen=True)
class Family:
    key: str  # flux | qwen | wan
    title: str
    filename: str
    rank: int
    alpha: float | None  # None: no alpha keys (loaders use scale 1)
    down_suffix: str
    up_suffix: str
    default_cap: int  # --max-rank the benchmark uses by default (half the rank, like bench_reduce)
    dtype: torch.dtype = torch.bfloat16

    def modules(self) -> list[ModuleSpec]:
        return sorted(_MODULES[self.key](), key=lambda s: s.name)

    def metadata(self, n_modules: int) -> dict[str, str]:
        return _METADATA[self.key](self, n_modules)


# ---------------------------------------------------------------------------------------------
# Module lists


def flux_modules() -> list[ModuleSpec]:
    dim, mlp = 3072, 4 * 3072
    specs = []
    for i in range(19):
        for stream in ("img", "txt"):
            base = f"lora_unet_double_blocks_{i}_{stream}"
            specs += [ModuleSpec(f"{base}_attn_qkv", 3 * dim, dim), ModuleSpec(f"{base}_attn_proj", dim, dim),
                      ModuleSpec(f"{base}_mlp_0", mlp, dim), ModuleSpec(f"{base}_mlp_2", dim, mlp),
                      ModuleSpec(f"{base}_mod_lin", 6 * dim, dim)]  # fmt: skip
    for i in range(38):
        base = f"lora_unet_single_blocks_{i}"
        specs += [ModuleSpec(f"{base}_linear1", 3 * dim + mlp, dim), ModuleSpec(f"{base}_linear2", dim, dim + mlp),
                  ModuleSpec(f"{base}_modulation_lin", 3 * dim, dim)]  # fmt: skip
    return specs


def qwen_modules() -> list[ModuleSpec]:
    dim, mlp = 3072, 4 * 3072
    specs = []
    for i in range(60):
        base = f"diffusion_model.transformer_blocks.{i}"
        attn = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
        specs += [ModuleSpec(f"{base}.attn.{p}", dim, dim) for p in attn]
        for stream in ("img", "txt"):
            specs += [ModuleSpec(f"{base}.{stream}_mlp.net.0.proj", mlp, dim),
                      ModuleSpec(f"{base}.{stream}_mlp.net.2", dim, mlp),
                      ModuleSpec(f"{base}.{stream}_mod.1", 6 * dim, dim)]  # fmt: skip
    return specs


def wan_modules() -> list[ModuleSpec]:
    dim, ffn = 5120, 13824
    specs = []
    for i in range(40):
        base = f"lora_unet_blocks_{i}"
        for attn in ("self_attn", "cross_attn"):
            specs += [ModuleSpec(f"{base}_{attn}_{p}", dim, dim) for p in ("q", "k", "v", "o")]
        specs += [ModuleSpec(f"{base}_ffn_0", ffn, dim), ModuleSpec(f"{base}_ffn_2", dim, ffn)]
    return specs


_MODULES = {"flux": flux_modules, "qwen": qwen_modules, "wan": wan_modules}


def _kohya_meta(module: str, base: str, arch: str):
    def build(fam: Family, n: int) -> dict[str, str]:
        return {
            "ss_network_module": module, "ss_network_dim": str(fam.rank), "ss_network_alpha": str(fam.alpha),
            "ss_base_model_version": base, "ss_output_name": fam.filename.removesuffix(".safetensors"),
            "ss_network_args": "{}", "ss_training_comment": f"lorad benchmark fixture, {n} modules",
            "ss_mixed_precision": "bf16", "ss_save_precision": "bf16",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
            "modelspec.title": fam.filename.removesuffix(".safetensors"),
            "sshs_model_hash": HASH_PLACEHOLDER, "sshs_legacy_hash": HASH_PLACEHOLDER[:8],
        }  # fmt: skip

    return build


def _aitoolkit_meta(fam: Family, n: int) -> dict[str, str]:
    software = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.x"}
    return {"format": "pt", "name": fam.filename.removesuffix(".safetensors"), "version": "1.0",
            "software": json.dumps(software), "training_info": json.dumps({"step": 3000, "epoch": 12})}


_METADATA = {
    "flux": _kohya_meta("networks.lora_flux", "flux1", "flux-1-dev/lora"),
    "qwen": _aitoolkit_meta,
    "wan": _kohya_meta("networks.lora_wan", "wan2.1_t2v_14B", "wan2.1-t2v-14b/lora"),
}

FAMILIES: dict[str, Family] = {
    "flux": Family("flux", "Flux.1-dev, kohya networks.lora_flux", "flux1_dev_r32.safetensors", 32, 16.0,
                   ".lora_down.weight", ".lora_up.weight", 16),
    "qwen": Family("qwen", "Qwen-Image, ai-toolkit (diffusion_model. + lora_A/lora_B, no alpha)",
                   "qwen_image_r64.safetensors", 64, None, ".lora_A.weight", ".lora_B.weight", 32),
    "wan": Family("wan", "Wan 2.1 T2V 14B, musubi-tuner networks.lora_wan", "wan21_14b_r32.safetensors", 32, 16.0,
                  ".lora_down.weight", ".lora_up.weight", 16),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Spectra and factors


def module_generator(name: str, seed: int) -> torch.Generator:
    """Per-module stream: a module's content depends on its name and the seed only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def random_spectrum(gen: torch.Generator, rank: int) -> torch.Tensor:
    """Half power law s_i = (i+1)^-p (p in 0.2..1.4), half exponential exp(-i/tau) (tau log-uniform
    in 1..rank), plus a noise floor of 0.2-2 % of s_0, times a strength of 0.05..0.5 (trained
    LoRA deltas are small next to the base weights; the value only sets the factors' magnitude).
    With fro 0.9 and a cap of rank/2 this gives ranks from 1 to the cap (median about rank/5,
    about 1 module in 6 at the cap)."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    i = torch.arange(rank, dtype=torch.float64)
    if u[0] < 0.5:
        s = (i + 1) ** -(0.2 + 1.2 * u[1])
    else:
        s = torch.exp(-i / math.exp(u[1] * math.log(rank)))
    floor = 0.002 * 10 ** u[2]
    s = (s + floor * torch.rand(rank, generator=gen, dtype=torch.float64)).sort(descending=True).values
    return s * (0.05 + 0.45 * u[3])


def planted_factors(spec: ModuleSpec, s: torch.Tensor, gen: torch.Generator, rank: int, scale: float):
    """(up, down) with scale * up @ down = Qb diag(s) Qa^T; sqrt(s) on each side, like trained factors."""
    qb, _ = torch.linalg.qr(torch.randn(spec.out_features, rank, generator=gen))
    qa, _ = torch.linalg.qr(torch.randn(spec.in_features, rank, generator=gen))
    rot, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen))
    root = (s / scale).sqrt().float()
    return (qb * root) @ rot, rot.T @ (qa * root).T


# ---------------------------------------------------------------------------------------------
# The file


def tensor_entries(fam: Family, specs: list[ModuleSpec]) -> list[tuple[str, tuple[int, ...]]]:
    """Every key and shape in data order (per module: alpha, down, up; sorted like safetensors)."""
    entries = []
    for spec in specs:
        keys = [(f"{spec.name}{fam.down_suffix}", (fam.rank, spec.in_features)),
                (f"{spec.name}{fam.up_suffix}", (spec.out_features, fam.rank))]  # fmt: skip
        if fam.alpha is not None:
            keys.append((f"{spec.name}.alpha", ()))
        entries += sorted(keys)
    return entries


def header_bytes(entries: list[tuple[str, tuple[int, ...]]], meta: dict[str, str], dtype: torch.dtype) -> bytes:
    doc: dict[str, object] = {"__metadata__": meta}
    offset, itemsize = 0, torch.tensor([], dtype=dtype).element_size()
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        doc[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    return t.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_family(fam: Family, path: Path, seed: int = 0) -> int:
    """Stream the file; returns its module count. sshs hashes are patched in at the end."""
    specs = fam.modules()
    meta = fam.metadata(len(specs))
    head = header_bytes(tensor_entries(fam, specs), meta, fam.dtype)
    scale = 1.0 if fam.alpha is None else fam.alpha / fam.rank
    data_hash = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for spec in specs:
            gen = module_generator(spec.name, seed)
            up, down = planted_factors(spec, random_spectrum(gen, fam.rank), gen, fam.rank, scale)
            parts = {f"{spec.name}{fam.down_suffix}": down, f"{spec.name}{fam.up_suffix}": up}
            if fam.alpha is not None:
                parts[f"{spec.name}.alpha"] = torch.tensor(fam.alpha)
            for key in sorted(parts):
                chunk = tensor_bytes(parts[key], fam.dtype)
                data_hash.update(chunk)
                f.write(chunk)
    if "sshs_model_hash" in meta:
        patch_hashes(tmp, head, data_hash.hexdigest())
    tmp.replace(path)
    return len(specs)


def patch_hashes(path: Path, head: bytes, model_hash: str) -> None:
    """sshs_model_hash = sha256 of the data section; sshs_legacy_hash = 64 KiB at 1 MiB (same lengths)."""
    with open(path, "r+b") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
        fixed = head.replace(f'"sshs_model_hash":"{HASH_PLACEHOLDER}"'.encode(), f'"sshs_model_hash":"{model_hash}"'.encode())
        fixed = fixed.replace(f'"sshs_legacy_hash":"{HASH_PLACEHOLDER[:8]}"'.encode(), f'"sshs_legacy_hash":"{legacy}"'.encode())
        assert len(fixed) == len(head)
        f.seek(8)
        f.write(fixed)


def path_for(fam: Family, out_dir: Path = OUT) -> Path:
    return out_dir / fam.filename


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append", help="repeatable; default all three")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder (default {OUT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.only or list(FAMILIES):
        fam = FAMILIES[key]
        path = path_for(fam, args.out)
        started = time.perf_counter()
        n = write_family(fam, path, args.seed)
        size = path.stat().st_size
        print(f"{key}: wrote {path}: {n} modules, rank {fam.rank}, {str(fam.dtype).split('.')[-1]}, "
              f"{size:,} B ({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
