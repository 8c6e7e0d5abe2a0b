"""The plain full-SVD reduction lorad is compared against (what kohya's resize_lora.py does, minus
its extra costs: no whole-file fp32 copy, thin SVD instead of full_matrices=True).

For each kohya module: dense dW = scale * up @ down in fp32, torch.linalg.svd(dW, full_matrices=False),
the smallest k with ||S[:k]|| / ||S|| >= p, capped at --max-rank, then new factors
up = U_k S_k * k / alpha, down = Vh_k under one constant alpha (the input's), saved with safetensors.
Writes the chosen ranks to --ranks-json for the benchmark to compare with lorad's.

    python benchmarks/_full_svd_baseline.py IN.safetensors OUT.safetensors --param 0.9 --max-rank 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def fro_rank(s: torch.Tensor, ratio: float, cap: int) -> int:
    """Smallest k with sqrt(sum_{i<k} s_i^2 / sum s_i^2) >= ratio, at most cap (and at least 1)."""
    kept = torch.sqrt(torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum())
    return max(1, min(int((kept < ratio).sum()) + 1, cap))


def reduce_module(f, name: str, ratio: float, cap: int, alpha_out: float) -> dict[str, torch.Tensor]:
    down = f.get_tensor(f"{name}.lora_down.weight").float()
    up = f.get_tensor(f"{name}.lora_up.weight").float()
    rank = down.shape[0]
    alpha = float(f.get_tensor(f"{name}.alpha")) if f"{name}.alpha" in f.keys() else float(rank)
    delta = (alpha / rank) * (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = fro_rank(s, ratio, cap)
    new_up = (u[:, :k] * s[:k]) * (k / alpha_out)  # one alpha for all; the rest folded into up
    return {
        f"{name}.lora_up.weight": new_up.half().contiguous(),
        f"{name}.lora_down.weight": vh[:k].half().contiguous(),
        f"{name}.alpha": torch.tensor(alpha_out, dtype=torch.float16),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plain per-module full-SVD LoRA reduction (benchmark baseline)")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--param", type=float, default=0.9, help="Frobenius norm ratio to keep")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--ranks-json", type=Path, help="write {module: rank} here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with safe_open(str(args.input), "pt") as f:
        metadata = dict(f.metadata() or {})
        names = [k[: -len(".lora_down.weight")] for k in f.keys() if k.endswith(".lora_down.weight")]
        alpha_out = float(f.get_tensor(f"{names[0]}.alpha")) if f"{names[0]}.alpha" in f.keys() else 1.0
        for name in names:
            module = reduce_module(f, name, args.param, args.max_rank, alpha_out)
            ranks[name] = module[f"{name}.lora_down.weight"].shape[0]
            out.update(module)
    metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    save_file(out, str(args.output), metadata=metadata)
    if args.ranks_json:
        args.ranks_json.write_text(json.dumps(ranks))
    print(f"full-SVD baseline: {len(names)} modules in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
