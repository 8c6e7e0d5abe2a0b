"""kohya sd-scripts `networks/resize_lora.py`, current path, re-implemented (our code) for benchmarks.

What it reproduces, step for step (reference/kohya_resize.md section 1 plus the code after PR #2194,
which dropped the extra +1, and PR #2240, which added svd_lowrank; sd-scripts v0.11.1):

* Load: the WHOLE file with safetensors `load_file`, then every tensor cast to float32 (resize_lora's
  merge dtype). Metadata from `safe_open().metadata()`.
* Walk every key; a key is a down factor when its last or second-to-last dot component is
  `lora_down`, `lora_A` or `down`; its up factor is the same key with `lora_up`/`lora_B`/`up`, its
  alpha `<module>.alpha`. old_rank = down rows; scale = alpha / old_rank, or 1.0 without alpha.
* Dense W = up @ down in float32 (no scale; convs flattened to (out, in*kh*kw)).
* Decompose: when BOTH dims exceed 2048 and --svd_lowrank_niter > 0,
  `torch.svd_lowrank(W, q=min(2 * new_rank, out, in), niter=2)`; otherwise
  `torch.linalg.svd(W)` with its default full_matrices=True. new_rank is --new_rank (or
  --new_conv_rank for 4-D modules), so the random range has 2 * cap columns.
* Rank: sv_fro: searchsorted(cumsum(S^2) / sum(S^2), p^2), clamped to [0, len(S) - 1], + 1;
  sv_cumulative: the same on S; sv_ratio: #{S > S_0 / p}; no method: new_rank. Then rank 1 when
  S_0 <= 1e-6, else capped at new_rank. len(S) is q on the svd_lowrank path, so the ratios are
  taken against the top-q energy only.
* New factors: up = U_k diag(S_k), down = Vh_k; alpha = scale * k (a 0-d tensor), so alpha/rank is
  kept and every module gets its own alpha. Cast to --save_precision on the way into the output
  dict, which starts as a shallow copy of the input dict (so the fp32 input stays alive to the end).
* Metadata: "Dynamic" dim/alpha and a training comment; every tensor cast to the save dtype;
  sshs_model_hash / sshs_legacy_hash computed from an in-memory `safetensors.torch.save` of the
  whole output (ss_* metadata only); then `save_file`.

Left out, as they do not touch the result or the resize's own cost: tqdm, the --verbose table,
.ckpt/.pt input and output, and the import of sd-scripts' `library` package (about 5 s of
import time in the real tool, reference/kohya_resize.md section 4), so this reference is, if
anything, a little faster than the real script.

    python benchmarks/_kohya_reference.py --model IN --save_to OUT --new_rank 16 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --save_precision bf16
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

MIN_SV = 1e-6
DOWN_UP = (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("down", "up"))  # kohya, PEFT, ControlLoRA
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_state_dict(path: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    sd = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    for key in list(sd):
        sd[key] = sd[key].to(dtype)
    return sd, metadata


# -- rank choice ------------------------------------------------------------------------------


def _clamp(index: int, n: int) -> int:
    return max(0, min(index, n - 1))


def fro_index(S: torch.Tensor, target: float) -> int:
    sq = S.pow(2)
    return _clamp(int(torch.searchsorted(torch.cumsum(sq, dim=0) / float(sq.sum()), target**2)), len(S))


def cumulative_index(S: torch.Tensor, target: float) -> int:
    return _clamp(int(torch.searchsorted(torch.cumsum(S, dim=0) / float(S.sum()), target)), len(S))


def ratio_index(S: torch.Tensor, target: float) -> int:
    return _clamp(int((S > S[0] / target).sum()) - 1, len(S))


INDEX = {"sv_fro": fro_index, "sv_cumulative": cumulative_index, "sv_ratio": ratio_index}


def choose_rank(S: torch.Tensor, cap: int, method: str | None, param: float | None, scale) -> tuple[int, float]:
    """(new_rank, new_alpha) exactly as resize_lora's rank_resize decides them."""
    new_rank = INDEX[method](S, param) + 1 if method else cap
    if S[0] <= MIN_SV:  # zero matrix
        new_rank = 1
    elif new_rank > cap:
        new_rank = cap
    return new_rank, float(scale * new_rank)


# -- one module -------------------------------------------------------------------------------


def decompose(W: torch.Tensor, cap: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_size, in_size = W.shape
    if niter > 0 and out_size > 2048 and in_size > 2048:
        U, S, V = torch.svd_lowrank(W, q=min(2 * cap, out_size, in_size), niter=niter)
        return U, S, V.T
    return torch.linalg.svd(W)  # full_matrices=True, as the script calls it


def resize_module(down: torch.Tensor, up: torch.Tensor, alpha, cap: int, args) -> tuple[torch.Tensor, ...]:
    old_rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / old_rank
    conv = down.dim() == 4
    W = up.reshape(up.shape[0], -1) @ down.reshape(old_rank, -1)  # merge: float32, no scale
    U, S, Vh = decompose(W, cap, args.svd_lowrank_niter)
    k, new_alpha = choose_rank(S, cap, args.dynamic_method, args.dynamic_param, scale)
    new_up = U[:, :k] @ torch.diag(S[:k])
    new_down = Vh[:k, :]
    if conv:
        new_down = new_down.reshape(k, *down.shape[1:])
        new_up = new_up.reshape(up.shape[0], k, 1, 1)
    del U, S, Vh, W
    return new_down, new_up, new_alpha


def find_down(key: str) -> tuple[str, str, str, str] | None:
    """(module, down part, up part, weight suffix) when `key` is a down factor."""
    parts = key.split(".")
    for down, up in DOWN_UP:
        if len(parts) >= 2 and parts[-2] == down:
            return ".".join(parts[:-2]), "." + down, "." + up, "." + parts[-1]
        if parts[-1] == down:
            return ".".join(parts[:-1]), "." + down, "." + up, ""
    return None


def resize_lora(sd: dict[str, torch.Tensor], args, save_dtype: torch.dtype) -> tuple[dict, int | None, float | None]:
    out = sd.copy()  # shallow: the float32 input stays referenced until the end, as in the script
    old_dim = new_alpha = None
    with torch.no_grad():
        for key, value in sd.items():
            found = find_down(key)
            if found is None:
                continue
            name, down_part, up_part, suffix = found
            up = sd.get(name + up_part + suffix)
            if up is None:
                continue
            alpha = sd.get(name + ".alpha")
            old_dim = max(old_dim or 0, value.shape[0])
            cap = args.new_conv_rank if value.dim() == 4 else args.new_rank
            new_down, new_up, new_alpha = resize_module(value, up, alpha, cap, args)
            out[name + down_part + suffix] = new_down.to(save_dtype).contiguous()
            out[name + up_part + suffix] = new_up.to(save_dtype).contiguous()
            out[name + ".alpha"] = torch.tensor(new_alpha).to(save_dtype)
    return out, old_dim, new_alpha  # the last module's alpha: what fixed mode writes as ss_network_alpha


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes: serialise the whole output in memory once more."""
    blob = io.BytesIO(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(blob.read(8), "little")
    blob.seek(8 + n)
    model = hashlib.sha256()
    for chunk in iter(lambda: blob.read(1 << 20), b""):
        model.update(chunk)
    blob.seek(0x100000)
    return model.hexdigest(), hashlib.sha256(blob.read(0x10000)).hexdigest()[:8]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="kohya resize_lora.py's current path (benchmark reference)")
    p.add_argument("--model", required=True)
    p.add_argument("--save_to", required=True)
    p.add_argument("--new_rank", type=int, default=4)
    p.add_argument("--new_conv_rank", type=int, default=None)
    p.add_argument("--save_precision", choices=sorted(SAVE_DTYPES), default=None)
    p.add_argument("--dynamic_method", choices=sorted(INDEX), default=None)
    p.add_argument("--dynamic_param", type=float, default=None)
    p.add_argument("--svd_lowrank_niter", type=int, default=2)
    p.add_argument("--device", default=None, help="accepted for compatibility; CPU only here")
    args = p.parse_args(argv)
    if args.new_conv_rank is None:
        args.new_conv_rank = args.new_rank
    if args.dynamic_method and not args.dynamic_param:
        raise SystemExit("If using dynamic_method, then dynamic_param is required")
    save_dtype = SAVE_DTYPES[args.save_precision or "float"]

    sd, metadata = load_state_dict(args.model, torch.float32)
    out, old_dim, last_alpha = resize_lora(sd, args, save_dtype)

    metadata = dict(metadata or {})
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_dim}; {comment}"
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    else:
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {args.new_rank}; {comment}"
        metadata["ss_network_dim"], metadata["ss_network_alpha"] = str(args.new_rank), str(last_alpha)
    for key, value in list(out.items()):
        if value.dtype.is_floating_point and value.dtype != save_dtype:
            out[key] = value.to(save_dtype)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(out, metadata)
    save_file(out, args.save_to, metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
