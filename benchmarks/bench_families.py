"""Benchmark: `lorad reduce` vs kohya resize_lora's current path on Flux.1, Qwen-Image and Wan 2.1 14B.

    python benchmarks/bench_families.py [--only flux|qwen|wan] [--runs N] [--skip-reference]
                                        [--max-rank R] [--param P]

For each family (files from make_family_loras.py, written to benchmarks/out/ when missing):
1. Times `lorad reduce FILE -o OUT --method fro --param 0.9 --max-rank R --json` (the installed CLI)
   in a fresh child per run; wall time is child start to exit (interpreter and imports included),
   peak RSS is the child's own ru_maxrss (started from _spawn.py). The median of --runs runs is printed.
2. Times _kohya_reference.py (dense W, torch.svd_lowrank niter 2 where both dims > 2048, full SVD
   otherwise, sv_fro with the same param, --new_rank R, --save_precision = the input's dtype) once,
   the same way.
3. Checks both outputs against the exact answer, module by module, in float64 from the factors
   (QR of up and down^T, SVD of the r x r core; no dense matrix): the written update (scale from the
   file's own rule: alpha / rank where an alpha key exists, else 1) against the best rank-k
   truncation T_k of the input's update at the tool's own k, as ||written - T_k||_F / ||T_k||_F, the
   largest over modules. The "rounding floor" is the same figure for T_k itself rounded to the
   output dtype (U_k S_k and V_k^T cast), i.e. what a perfect tool writing that dtype gets. Also: how
   many modules got another rank than the exact rule (smallest k with ||S_k|| / ||S|| >= param,
   capped at R), and the norm each tool's k really keeps.
Targets (issue 7): lorad >= 10x faster than the reference on each file, peak RSS < 1.5 GB, exact to
the output dtype's rounding.

R defaults to half the file's rank (flux 16, qwen 32, wan 16), like bench_reduce.py's 64 of 128.
Then the reference's random range (q = 2R columns) spans the whole rank-r update and svd_lowrank
is exact up to float32; with R < rank/2 (e.g. --max-rank 16 on qwen) it sees only the top 2R
directions and its fro rule is biased (reference/kohya_resize.md, #2240).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
SPAWN = HERE / "_spawn.py"  # starts each measured command from a small process (its own peak RSS)
sys.path.insert(0, str(HERE))
from make_family_loras import FAMILIES, Family, path_for

OUT = HERE / "out"
TARGET_SPEEDUP, TARGET_RSS_GB, FLOOR_SLACK = 10.0, 1.5, 1.5
PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


# ---------------------------------------------------------------------------------------------
# Running a child


@dataclass
class Run:
    wall: float
    peak_rss: int  # bytes
    stdout: str
    load_max: float  # highest 1-min load average sampled while it ran
    cpu: float = 0.0  # user + system seconds (OpenMP threads spin at barriers, so contention inflates it too)


def measure(cmd: list[str]) -> Run:
    """Run `cmd` as a fresh child: wall time, its own peak RSS (wait4), the load average meanwhile."""
    loads, done = [os.getloadavg()[0]], threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as usage:  # fmt: skip
        started = time.perf_counter()
        # started from a fresh small process (_spawn.py): its peak RSS, not this benchmark's
        code = subprocess.run([sys.executable, str(SPAWN), usage.name, *cmd], stdout=out, stderr=err).returncode
        wall = time.perf_counter() - started
        done.set()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        maxrss_kib, cpu = usage.read().split()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr[-4000:]}")
    return Run(wall, int(maxrss_kib) * 1024, stdout, max(loads), float(cpu))


def lorad_command() -> list[str]:
    exe = Path(sys.executable).with_name("lorad")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lorad"]


def run_lorad(src: Path, dst: Path, cap: int, args: argparse.Namespace) -> list[Run]:
    cmd = lorad_command() + ["reduce", str(src), "-o", str(dst), "--method", "fro", "--param", str(args.param),
                             "--max-rank", str(cap), "--json"]  # fmt: skip
    runs = []
    for _ in range(args.runs):
        dst.unlink(missing_ok=True)
        runs.append(measure(cmd))
    return runs


def run_reference(src: Path, dst: Path, cap: int, dtype: str, args: argparse.Namespace) -> Run:
    dst.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "_kohya_reference.py"), "--model", str(src), "--save_to", str(dst),
           "--new_rank", str(cap), "--dynamic_method", "sv_fro", "--dynamic_param", str(args.param),
           "--save_precision", dtype, "--svd_lowrank_niter", str(args.niter)]  # fmt: skip
    return measure(cmd)


# ---------------------------------------------------------------------------------------------
# The exactness check (float64, factored)


@dataclass
class Accuracy:
    modules: int = 0
    max_dev: float = 0.0
    worst: str = ""
    devs: list[float] = field(default_factory=list)
    rank_diff: dict[int, int] = field(default_factory=dict)  # tool k - exact k -> modules
    min_kept: float = 1.0  # smallest ||S_k|| / ||S|| at the tool's k, over modules below the cap
    below_param: int = 0  # modules below the cap whose k keeps less than param of the norm
    ranks: list[int] = field(default_factory=list)

    def add(self, name: str, dev: float, k: int, k_exact: int, kept: float, capped: bool, param: float) -> None:
        self.modules += 1
        self.devs.append(dev)
        self.ranks.append(k)
        if dev > self.max_dev:
            self.max_dev, self.worst = dev, name
        if k != k_exact:
            self.rank_diff[k - k_exact] = self.rank_diff.get(k - k_exact, 0) + 1
        if not capped:
            self.min_kept = min(self.min_kept, kept)
            self.below_param += kept < param - 1e-9

    @property
    def differing(self) -> int:
        return sum(self.rank_diff.values())


class LoraFile:
    """Modules of a written file, read one at a time; the scale by alpha / rank, else 1."""

    def __init__(self, path: Path):
        self.path = path
        self.f = safe_open(str(path), "pt")
        self.keys = set(self.f.keys())
        self.metadata = self.f.metadata() or {}
        self.modules: dict[str, tuple[str, str]] = {}
        for key in self.keys:
            for down, up in PAIRS:
                if key.endswith(down) and key[: -len(down)] + up in self.keys:
                    self.modules[key[: -len(down)]] = (key, key[: -len(down)] + up)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, torch.dtype]:
        down_key, up_key = self.modules[name]
        down, up = self.f.get_tensor(down_key), self.f.get_tensor(up_key)
        rank = down.shape[0]
        scale = 1.0
        if f"{name}.alpha" in self.keys:
            alpha = float(self.f.get_tensor(f"{name}.alpha"))
            scale = 1.0 if alpha == 0 else alpha / rank
        up2 = up.reshape(up.shape[0], rank).double() * scale
        return up2, down.reshape(rank, -1).double(), scale, up.dtype


def diff_norm(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """||b1 a1 - b2 a2||_F from the thin factors: QR of [b1, -b2] and [a1; a2]^T, norm of R_l R_r^T."""
    r_left = torch.linalg.qr(torch.cat([b1, -b2], dim=1), mode="r")[1]
    r_right = torch.linalg.qr(torch.cat([a1, a2], dim=0).T, mode="r")[1]
    return float(torch.linalg.matrix_norm(r_left @ r_right.T))


def apply_q(reflectors: torch.Tensor, tau: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Q @ coeffs for the Q of geqrf, coeffs (r, c) padded to Q's n rows."""
    padded = coeffs.new_zeros(reflectors.shape[0], coeffs.shape[1])
    padded[: coeffs.shape[0]] = coeffs
    return torch.ormqr(reflectors, tau, padded)


def truncation(left: torch.Tensor, S: torch.Tensor, right: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T_k = (left_k S_k) (right_k^T), as its two thin factors."""
    return left[:, :k] * S[:k], right[:, :k].T


def exact_rank(S: torch.Tensor, param: float, cap: int) -> int:
    kept = torch.sqrt(torch.cumsum(S * S, 0) / (S * S).sum())
    reached = torch.nonzero(kept >= param - 1e-12)
    k = int(reached[0]) + 1 if len(reached) else len(S)
    return max(1, min(k, cap))


def check(src: Path, outputs: dict[str, Path], cap: int, param: float) -> tuple[dict[str, Accuracy], Accuracy]:
    """Per tool: its Accuracy; plus the rounding floor at the exact rank, in the input's dtype."""
    torch.set_num_threads(1)  # small kernels: one thread is as fast, and it spins less on a busy machine
    source = LoraFile(src)
    files = {tool: LoraFile(p) for tool, p in outputs.items()}
    acc = {tool: Accuracy() for tool in outputs}
    floor = Accuracy()
    for name in sorted(source.modules):
        up, down, _, dtype = source.factors(name)
        r = down.shape[0]
        (hb, tb), (ha, ta) = torch.geqrf(up), torch.geqrf(down.T)  # Q kept as reflectors (orgqr is slow)
        u, S, vh = torch.linalg.svd(hb[:r].triu() @ ha[:r].triu().T)
        left, right = apply_q(hb, tb, u), apply_q(ha, ta, vh.T)  # dW = left diag(S) right^T exactly
        norm = float(torch.linalg.vector_norm(S))
        k_exact = exact_rank(S, param, min(cap, r))

        for tool, f in files.items():
            b, a, _, _ = f.factors(name)
            k = a.shape[0]
            tb, ta = truncation(left, S, right, k)
            dev = diff_norm(b, a, tb, ta) / float(torch.linalg.vector_norm(S[:k]))
            kept = float(torch.linalg.vector_norm(S[:k])) / norm
            acc[tool].add(name, dev, k, k_exact, kept, k >= min(cap, r), param)
        tb, ta = truncation(left, S, right, k_exact)
        fb, fa = tb.to(dtype).double(), ta.to(dtype).double()
        floor.add(name, diff_norm(fb, fa, tb, ta) / float(torch.linalg.vector_norm(S[:k_exact])), k_exact, k_exact,
                  float(torch.linalg.vector_norm(S[:k_exact])) / norm, k_exact >= min(cap, r), param)  # fmt: skip
    return acc, floor


# ---------------------------------------------------------------------------------------------
# Report


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def dtype_name(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        key = next(k for k in f.keys() if k.endswith((PAIRS[0][0], PAIRS[1][0])))  # noqa: SIM118 (no __iter__)
        dtype = f.get_slice(key).get_dtype()
    return {"BF16": "bf16", "F16": "fp16", "F32": "float"}[dtype]


def describe(tool: str, a: Accuracy, floor: Accuracy) -> str:
    diffs = ", ".join(f"{d:+d}: {n}" for d, n in sorted(a.rank_diff.items())) or "none"
    ranks = a.ranks
    return (f"  {tool:<9} max dev {a.max_dev:.2e} (median {statistics.median(a.devs):.2e}; "
            f"{a.max_dev / floor.max_dev:.2f}x the floor's max); ranks: mean {statistics.mean(ranks):.1f}, "
            f"median {statistics.median(ranks):g}, {a.differing} of {a.modules} differ from the exact rule ({diffs}); "
            f"below the cap, min norm kept {a.min_kept:.4f}, {a.below_param} modules under the param")  # fmt: skip


def bench_family(fam: Family, args: argparse.Namespace) -> dict:
    src = path_for(fam)
    if not src.exists() or args.regenerate:
        print(f"generating {src} ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "make_family_loras.py"), "--only", fam.key], check=True)
    cap = args.max_rank or fam.default_cap
    dtype = dtype_name(src)
    with safe_open(str(src), "pt") as f:
        n_modules = sum(1 for k in f.keys() if k.endswith((PAIRS[0][0], PAIRS[1][0])))  # noqa: SIM118
    print(f"\n== {fam.key}: {fam.title}\n   {src} ({src.stat().st_size:,} B, {n_modules} modules, rank {fam.rank}, "
          f"{dtype}); fro {args.param}, cap {cap}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
          flush=True)  # fmt: skip
    stem = src.name.removesuffix(".safetensors")
    lorad_out = OUT / f"{stem}.lorad.safetensors"
    runs = run_lorad(src, lorad_out, cap, args)
    wall = sorted(r.wall for r in runs)[(len(runs) - 1) // 2]
    rss = max(r.peak_rss for r in runs)
    engine = ""
    try:
        report = json.loads(sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2].stdout)
        engine = f", engine {report['seconds']:.2f} s"
    except (ValueError, KeyError, TypeError):
        pass
    walls = ", ".join(f"{r.wall:.2f}" for r in runs)
    cpu = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2].cpu
    print(f"lorad reduce: wall {wall:.2f} s (median of {len(runs)}: {walls}){engine}, cpu {cpu:.1f} s, peak RSS {gb(rss)}, "
          f"output {lorad_out.stat().st_size:,} B; load average max {max(r.load_max for r in runs):.2f}")
    print(f"target peak RSS < {TARGET_RSS_GB:g} GB: {verdict(rss < TARGET_RSS_GB * 1e9)}", flush=True)
    result = {"family": fam.key, "file": str(src), "bytes": src.stat().st_size, "modules": n_modules,
              "rank": fam.rank, "cap": cap, "param": args.param,
              "lorad": {"walls": [r.wall for r in runs], "wall": wall, "cpu": cpu, "peak_rss": rss,
                        "output_bytes": lorad_out.stat().st_size}}  # fmt: skip
    outputs = {"lorad": lorad_out}
    if not args.skip_reference:
        ref_out = OUT / f"{stem}.kohyaref.safetensors"
        print(f"running the kohya reference (svd_lowrank niter {args.niter}; minutes) ...", flush=True)
        ref = run_reference(src, ref_out, cap, dtype, args)
        speedup = ref.wall / wall
        print(f"reference:    wall {ref.wall:.2f} s, cpu {ref.cpu:.1f} s, peak RSS {gb(ref.peak_rss)}, output {ref_out.stat().st_size:,} B; "
              f"load average max {ref.load_max:.2f}")  # fmt: skip
        print(f"speed-up: {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x: {verdict(speedup >= TARGET_SPEEDUP)})")
        result["reference"] = {"wall": ref.wall, "cpu": ref.cpu, "peak_rss": ref.peak_rss, "output_bytes": ref_out.stat().st_size,
                               "speedup": speedup}  # fmt: skip
        outputs["reference"] = ref_out
    print("checking against the exact truncation (float64, factored) ...", flush=True)
    started = time.perf_counter()
    acc, floor = check(src, outputs, cap, args.param)
    print(f"deviation ||written - T_k||_F / ||T_k||_F at each tool's own k, over {floor.modules} modules "
          f"({time.perf_counter() - started:.0f} s):")
    print(f"  {'floor':<9} max dev {floor.max_dev:.2e} (median {statistics.median(floor.devs):.2e}): T_k at the "
          f"exact rank rounded to {dtype}; exact ranks mean {statistics.mean(floor.ranks):.1f}, "
          f"median {statistics.median(floor.ranks):g}, {sum(k >= cap for k in floor.ranks)} at the cap")
    for tool, a in acc.items():
        print(describe(tool, a, floor))
        result.setdefault(tool, {}).update(
            {"max_dev": a.max_dev, "worst": a.worst, "rank_diff": a.rank_diff, "min_kept": a.min_kept,
             "below_param": a.below_param})  # fmt: skip
    result["floor_max_dev"] = floor.max_dev
    exact = acc["lorad"].differing == 0 and acc["lorad"].max_dev <= FLOOR_SLACK * floor.max_dev
    print(f"target lorad exact to {dtype} rounding (same ranks as the exact rule, max dev <= "
          f"{FLOOR_SLACK:g}x the floor's): {verdict(exact)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(FAMILIES), action="append", help="repeatable; default all three")
    parser.add_argument("--runs", type=int, default=1, help="lorad runs per file; the median is printed")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--max-rank", type=int, help="cap for both tools (default: half each file's rank)")
    parser.add_argument("--param", type=float, default=0.9, help="fro: the norm ratio to keep")
    parser.add_argument("--niter", type=int, default=2, help="the reference's --svd_lowrank_niter")
    parser.add_argument("--regenerate", action="store_true", help="rewrite the input files first")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    print(f"lorad: {' '.join(lorad_command())}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = [bench_family(FAMILIES[key], args) for key in (args.only or list(FAMILIES))]
    cap = f".cap{args.max_rank}" if args.max_rank else ""
    lorad_only = ".lorad-only" if args.skip_reference else ""
    summary = OUT / f"bench_families.{'-'.join(args.only or FAMILIES)}{cap}{lorad_only}.json"
    summary.write_text(json.dumps(results, indent=1))
    print(f"\nsummary written to {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
