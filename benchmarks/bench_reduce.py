"""Benchmark: `lorad reduce` on a realistic SDXL LoRA vs a plain per-module full-SVD reduction.

    python benchmarks/bench_reduce.py [--repeat N] [--skip-baseline] [--limit N] [--device cpu]

1. Writes benchmarks/out/sdxl_r128.safetensors (make_sdxl_lora.py) if it is missing.
2. Times `lorad reduce FILE --method fro --param 0.9 --max-rank 64 --json -o OUT` in a fresh child
   process per run (started from _spawn.py) and reads that child's own peak RSS, median over --repeat runs.
3. Times _full_svd_baseline.py (dense dW, torch.linalg.svd, same rule) the same way, once.
4. Prints wall time, peak RSS, the speed ratio, lorad's output size and mean fro retained, and how
   many modules the two chose different ranks for. Targets: < 20 s, < 1.5 GB, >= 30x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPAWN = HERE / "_spawn.py"  # starts each measured command from a small process (its own peak RSS)
OUT = HERE / "out"
DEFAULT_INPUT = OUT / "sdxl_r128.safetensors"
TARGET_SECONDS, TARGET_RSS_GB, TARGET_SPEEDUP = 20.0, 1.5, 30.0


@dataclass(frozen=True)
class Run:
    wall: float  # seconds, child start to exit
    peak_rss: int  # bytes, the child's own maximum resident set (its waited-for children included)
    stdout: str


def measure(cmd: list[str]) -> Run:
    """Run `cmd` as a fresh child; wall time and that child's peak RSS from wait4's rusage."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as usage:  # fmt: skip
        started = time.perf_counter()
        # files, not pipes: no deadlock on big JSON; started from a fresh small process (_spawn.py),
        # so the peak RSS is the command's own, not this benchmark's
        code = subprocess.run([sys.executable, str(SPAWN), usage.name, *cmd], stdout=out, stderr=err).returncode
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        maxrss_kib = int(usage.read().split()[0])  # ru_maxrss is in KiB on Linux
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr[-4000:]}")
    return Run(wall, maxrss_kib * 1024, stdout)


def ensure_input(path: Path, limit: int | None) -> None:
    if path.exists():
        return
    cmd = [sys.executable, str(HERE / "make_sdxl_lora.py"), str(path)]
    if limit:
        cmd += ["--limit", str(limit)]
    print(f"generating {path} ...", flush=True)
    subprocess.run(cmd, check=True)


def run_lorad(src: Path, dst: Path, args: argparse.Namespace) -> tuple[list[Run], dict]:
    cmd = [sys.executable, "-m", "lorad", "reduce", str(src), "--method", "fro", "--param", str(args.param),
           "--max-rank", str(args.max_rank), "--device", args.device, "--json", "-o", str(dst)]  # fmt: skip
    runs = []
    for _ in range(args.repeat):
        dst.unlink(missing_ok=True)
        runs.append(measure(cmd))
    median_run = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]
    return runs, json.loads(median_run.stdout)  # the report of the run whose wall time is printed


def run_baseline(src: Path, dst: Path, ranks_path: Path, args: argparse.Namespace) -> tuple[Run, dict]:
    cmd = [sys.executable, str(HERE / "_full_svd_baseline.py"), str(src), str(dst), "--param", str(args.param),
           "--max-rank", str(args.max_rank), "--ranks-json", str(ranks_path)]  # fmt: skip
    run = measure(cmd)
    return run, json.loads(ranks_path.read_text())


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report_lorad(src: Path, runs: list[Run], report: dict) -> tuple[float, int]:
    wall = sorted(r.wall for r in runs)[(len(runs) - 1) // 2]  # a run's own time (lower median)
    rss = max(r.peak_rss for r in runs)
    walls = ", ".join(f"{r.wall:.2f}" for r in runs)
    ranks = [m["rank_out"] for m in report["modules"] if m["skipped"] is None]
    out_bytes, in_bytes = report["output"]["bytes"], src.stat().st_size
    print(f"lorad reduce: wall {wall:.2f} s (median of {len(runs)}: {walls}), engine {report['seconds']:.2f} s, "
          f"peak RSS {gb(rss)}")  # fmt: skip
    print(f"lorad output: {out_bytes:,} B ({100 * out_bytes / in_bytes:.1f} % of input), "
          f"fro retained {report['fro_retained_file']:.4f} over the file (module mean {report['fro_retained_mean']:.4f}, "
          f"module min {report['fro_retained_min']:.4f}), "
          f"ranks mean {statistics.mean(ranks):.1f} median {statistics.median(ranks):g} "
          f"min {min(ranks)} max {max(ranks)}")  # fmt: skip
    print(f"target lorad < {TARGET_SECONDS:g} s: {verdict(wall < TARGET_SECONDS)}; "
          f"peak RSS < {TARGET_RSS_GB:g} GB: {verdict(rss < TARGET_RSS_GB * 1e9)}")
    return wall, rss


def compare_ranks(report: dict, baseline_ranks: dict[str, int]) -> None:
    lorad_ranks = {m["name"]: m["rank_out"] for m in report["modules"] if m["skipped"] is None}
    differ = [n for n in baseline_ranks if lorad_ranks.get(n) != baseline_ranks[n]]
    print(f"ranks: {len(differ)} of {len(baseline_ranks)} modules differ between lorad and the full-SVD baseline")
    for name in differ[:10]:
        print(f"  {name}: lorad {lorad_ranks.get(name)}, full SVD {baseline_ranks[name]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, help=f"default {DEFAULT_INPUT} (made when missing)")
    parser.add_argument("--limit", type=int, help="use a generated N-module input (out/sdxl_r128_limitN)")
    parser.add_argument("--repeat", type=int, default=1, help="lorad runs; the median wall time is printed")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--param", type=float, default=0.9)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    src = args.input or (OUT / f"sdxl_r128_limit{args.limit}.safetensors" if args.limit else DEFAULT_INPUT)
    ensure_input(src, args.limit)
    stem = src.name.removesuffix(".safetensors")
    print(f"input: {src} ({src.stat().st_size:,} B); load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    runs, report = run_lorad(src, OUT / f"{stem}.lorad.safetensors", args)
    wall, _ = report_lorad(src, runs, report)
    if args.skip_baseline:
        return 0
    print("running the full-SVD baseline (minutes) ...", flush=True)
    base, base_ranks = run_baseline(src, OUT / f"{stem}.fullsvd.safetensors", OUT / f"{stem}.fullsvd.ranks.json", args)
    print(f"full-SVD baseline: wall {base.wall:.2f} s, peak RSS {gb(base.peak_rss)}")
    speedup = base.wall / wall
    print(f"speed-up: {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x: {verdict(speedup >= TARGET_SPEEDUP)})")
    compare_ranks(report, base_ranks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
