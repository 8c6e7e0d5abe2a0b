"""`lorad reduce` and `lorad plan`: run the engine on one file, no daemon needed.

`lorad reduce PATH --policy P` is the daemon's "enqueue now" and goes over the socket instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from lorad.control.views import human_bytes
from lorad.reduce.methods import METHODS
from lorad.report import Report

# lorad.engine (and torch) load inside the commands, so `lorad status` and friends start fast.

_BAR_MIN_MODULES = 20


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, help_text in (
        ("reduce", _reduce, "reduce one LoRA now (or, with --policy, ask the daemon to)"),
        ("plan", _plan, "show the ranks `reduce` would choose; write nothing"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("input", type=Path, help=".safetensors LoRA file or PEFT adapter directory")
        if name == "reduce":
            p.add_argument("-o", "--output", type=Path, help="output path (default: <stem>.<method><param>.safetensors)")
            p.add_argument("--policy", help="enqueue on the running daemon under this policy instead")
            p.add_argument("--socket", help="daemon socket (with --policy)")
            p.add_argument("--config", help="daemon config file (with --policy)")
        p.add_argument("--method", choices=METHODS, default=None, help="rank selection (default fro)")
        p.add_argument("--param", type=float, help="rank, ratio, or fraction, per method")
        p.add_argument("--max-rank", type=int, help="cap every module's rank")
        p.add_argument("--budget-mb", type=float, help="whole-file size target in MiB (method budget)")
        p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
        p.add_argument("--dtype", help="output dtype: fp16, bf16 or fp32 (default: as input)")
        p.add_argument("--kohya-compat", action="store_true", help="choose ranks exactly as kohya resize_lora.py")
        p.add_argument("--convert-lycoris", action="store_true",
                       help="rebuild plain LoHa/LoKr modules as LoRA (a format change; off by default)")
        p.add_argument("--seed", type=int, default=0, help="random seed (method project)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("-v", "--verbose", action="store_true", help="list every module")
        p.set_defaults(func=func)


def _settings(args: argparse.Namespace):  # -> lorad.engine.ReduceSettings
    from lorad.engine import ReduceSettings

    method = args.method or ("budget" if args.budget_mb is not None else "fro")
    param = args.param if args.param is not None or method == "budget" else 0.9 if method == "fro" else None
    return ReduceSettings(method=method, param=param, max_rank=args.max_rank, budget_mb=args.budget_mb,
                          device=args.device, dtype=args.dtype, kohya_compat=args.kohya_compat,
                          convert_lycoris=args.convert_lycoris, seed=args.seed)


def _reduce(args: argparse.Namespace) -> int:
    if args.policy:
        from lorad._cli_client import enqueue_command

        args.path = args.input
        return enqueue_command(args)
    from lorad.engine import reduce_file

    with _Bar(enabled=not args.json) as bar:
        report = reduce_file(args.input, args.output, _settings(args), progress=bar.update)
    _emit(report, args)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lorad.engine import plan_file

    with _Bar(enabled=not args.json) as bar:
        report = plan_file(args.input, _settings(args), progress=bar.update)
    _emit(report, args)
    return 0


def _emit(report: Report, args: argparse.Namespace) -> None:
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_summary(report, verbose=args.verbose))


def format_summary(report: Report, verbose: bool = False) -> str:
    """A person's view: sizes, quality, the rank histogram, skipped modules and the worst modules."""
    inp, out = report.input, report.output
    lines = [f"input    {inp.path}  ({inp.format}, {inp.modules} modules, {human_bytes(inp.bytes)})"]
    if out:
        lines.append(f"output   {out.path}  ({human_bytes(out.bytes)}, {100 * out.bytes / inp.bytes:.1f}% of input)")
    else:
        planned = inp.bytes - sum(m.bytes_in - m.bytes_out for m in report.modules)
        lines.append(f"plan     about {human_bytes(planned)} ({100 * planned / inp.bytes:.1f}% of input); nothing written")
    lines.append(f"method   {report.method} {report.param if report.param is not None else ''}  "
                 f"on {report.device} in {report.seconds:.2f} s")
    reduced = report.reduced
    if reduced:
        ranks = sorted(m.rank_out for m in reduced)
        lines.append(f"ranks    {ranks[0]}..{ranks[-1]}, median {ranks[len(ranks) // 2]} "
                     f"(from {Counter(m.rank_in for m in reduced).most_common(1)[0][0]})")
        lines.append(f"quality  fro retained mean {report.fro_retained_mean:.4f}, min {report.fro_retained_min:.4f}; "
                     f"rel error max {max(m.rel_error for m in reduced):.4f}")
    lines.extend(f"note     {n}" for n in report.notes)
    skipped = [m for m in report.modules if m.skipped]
    if skipped:
        lines.append(f"skipped  {len(skipped)} modules passed through unchanged:")
        lines.extend(f"  {m.name}: {m.skipped}" for m in skipped)
    shown = reduced if verbose else sorted(reduced, key=lambda m: m.fro_retained)[:5]
    if shown:
        lines.append("modules" if verbose else "lowest retained:")
        width = max(len(m.name) for m in shown)
        lines.append(f"  {'name':<{width}}  kind     rank  fro_ret  rel_err")
        lines.extend(f"  {m.name:<{width}}  {m.kind:<7} {m.rank_in:>3}>{m.rank_out:<3} {m.fro_retained:7.4f}  "
                     f"{m.rel_error:7.4f}" for m in shown)
    return "\n".join(lines) + "\n"


class _Bar:
    """A one-line progress bar on stderr, only for a terminal and a file with many modules."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.drawn = False

    def update(self, done: int, total: int) -> None:
        if not self.enabled or total < _BAR_MIN_MODULES:
            return
        filled = 30 * done // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} modules")
        sys.stderr.flush()
        self.drawn = True

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.drawn:
            sys.stderr.write("\n")
