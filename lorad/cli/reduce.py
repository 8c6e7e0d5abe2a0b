"""`lorad reduce` and `lorad plan`: run the engine on LoRA files, no daemon needed.

One input: a summary (or one JSON object). Several inputs or a folder: one row per file as each
finishes and a total, or with --json one JSON object per file (JSON lines); a file that fails is
named with its reason and the others go on; the exit status is 2 if any failed.
`lorad reduce PATH --policy P` is the daemon's "enqueue now" and goes over the socket instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lorad.engine.reduce.methods import METHODS
from lorad.engine.reduce.rank_rules import SERVERS
from lorad.engine.report import Report
from lorad.errors import LoradError
from lorad.sizes import human_bytes

# lorad.engine.engine (and torch) load inside the commands, so `lorad status` and friends start fast.

_BAR_MIN_MODULES = 20


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, help_text in (
        ("reduce", _reduce, "reduce one LoRA now (or, with --policy, ask the daemon to)"),
        ("plan", _plan, "show the ranks `reduce` would choose; write nothing"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("input", type=Path, nargs="+",
                       help=".safetensors LoRA files, PEFT adapter folders, or folders of them")
        if name == "reduce":
            p.add_argument("-o", "--output", type=Path,
                           help="output path; with several inputs or a folder, the output folder "
                                "(default: beside each input, <stem>.<method><param>.safetensors)")
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
        p.add_argument("--rank-multiple", type=int, metavar="M",
                       help="every module keeps a multiple of M directions (rounded up)")
        p.add_argument("--uniform", action="store_true",
                       help="one rank for every module: the smallest that meets the method everywhere")
        p.add_argument("--serve", choices=SERVERS,
                       help="meet this server's rank rules (vllm, lorax, diffusers-hotswap with --max-rank)")
        p.add_argument("--seed", type=int, default=0, help="random seed (method project)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("-v", "--verbose", action="store_true", help="list every module")
        p.set_defaults(func=func)


def _settings(args: argparse.Namespace):  # -> lorad.engine.engine.ReduceSettings
    from lorad.engine.engine import ReduceSettings

    method = args.method or ("budget" if args.budget_mb is not None else "fro")
    param = args.param if args.param is not None or method == "budget" else 0.9 if method == "fro" else None
    return ReduceSettings(method=method, param=param, max_rank=args.max_rank, budget_mb=args.budget_mb,
                          device=args.device, dtype=args.dtype, kohya_compat=args.kohya_compat,
                          convert_lycoris=args.convert_lycoris, seed=args.seed,
                          rank_multiple=args.rank_multiple, uniform=args.uniform, serve=args.serve)


def _reduce(args: argparse.Namespace) -> int:
    if args.policy:
        from lorad.cli.control import enqueue_command

        if len(args.input) != 1:
            raise LoradError("--policy asks the daemon about one watched file at a time")
        args.path = args.input[0]
        return enqueue_command(args)
    from lorad.engine.batch import is_batch
    from lorad.engine.engine import reduce_file

    if is_batch(args.input):
        return _batch(args, lambda src, dst: reduce_file(src, dst, _settings(args)))
    with _Bar(enabled=not args.json) as bar:
        report = reduce_file(args.input[0], args.output, _settings(args), progress=bar.update)
    _emit(report, args)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from lorad.engine.batch import is_batch
    from lorad.engine.engine import plan_file

    if is_batch(args.input):
        return _batch(args, lambda src, _dst: plan_file(src, _settings(args)))
    with _Bar(enabled=not args.json) as bar:
        report = plan_file(args.input[0], _settings(args), progress=bar.update)
    _emit(report, args)
    return 0


def _batch(args: argparse.Namespace, run: Callable[[Path, Path | None], Report]) -> int:
    from lorad.engine.batch import plan_batch
    from lorad.engine.engine import default_output_path

    settings = _settings(args)
    settings.validate()  # a bad --method fails once, not once per file
    outdir = getattr(args, "output", None)
    if outdir is not None and outdir.exists() and not outdir.is_dir():
        raise LoradError(f"{outdir}: with several inputs or a folder, -o names an output folder")
    items = plan_batch(args.input, outdir, lambda src: default_output_path(src, settings))
    table = _BatchTable(json_lines=args.json)
    for item in items:
        if item.skipped:
            table.skipped(item.src, item.skipped)
            continue
        if item.error:
            table.failed(item.src, item.error)
            continue
        if item.dst is not None:
            item.dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            report = run(item.src, item.dst)
        except LoradError as e:
            table.failed(item.src, str(e))
        else:
            table.done(report)
    table.total()
    return 2 if table.failures else 0


class _BatchTable:
    """Rows printed as files finish (a long batch shows progress), then one total line."""

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.failures = self.reduced = self.bytes_in = self.bytes_out = 0
        if not json_lines:
            print(f"{'status':<8} {'size in':>9} {'size out':>9} {'kept':>6} {'fro':>6}  file")

    def done(self, report: Report) -> None:
        self.reduced += 1
        out_bytes = report.output.bytes if report.output else _planned_bytes(report)
        self.bytes_in += report.input.bytes
        self.bytes_out += out_bytes
        if self.json_lines:
            _json_line(report.to_json())
            return
        fro = report.fro_retained_file
        print(f"{'ok':<8} {human_bytes(report.input.bytes):>9} {human_bytes(out_bytes):>9} "
              f"{100 * out_bytes / report.input.bytes:5.1f}% {'' if fro is None else f'{fro:.4f}':>6}  "
              f"{report.input.path}" + (f" -> {report.output.path}" if report.output else ""))
        for note in report.notes:
            print(f"{'':<8} note: {note}")

    def failed(self, src: Path, message: str) -> None:
        self.failures += 1
        message = message.removeprefix(f"{src}: ")  # the row already names the file
        if self.json_lines:
            _json_line({"input": {"path": str(src)}, "error": message})
        else:
            print(f"{'FAILED':<8} {'':>9} {'':>9} {'':>6} {'':>6}  {src}: {message}")

    def skipped(self, src: Path, why: str) -> None:
        if self.json_lines:
            _json_line({"input": {"path": str(src)}, "skipped": why})
        else:
            print(f"{'skipped':<8} {'':>9} {'':>9} {'':>6} {'':>6}  {src}: {why}")

    def total(self) -> None:
        if self.json_lines:
            return
        saved = f", {human_bytes(self.bytes_in)} -> {human_bytes(self.bytes_out)}" if self.reduced else ""
        print(f"{self.reduced} reduced, {self.failures} failed{saved}")


def _planned_bytes(report: Report) -> int:
    return report.input.bytes - sum(m.bytes_in - m.bytes_out for m in report.modules)


def _json_line(doc: dict) -> None:
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


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
        planned = _planned_bytes(report)
        lines.append(f"plan     about {human_bytes(planned)} ({100 * planned / inp.bytes:.1f}% of input); nothing written")
    lines.append(f"method   {report.method} {report.param if report.param is not None else ''}  "
                 f"on {report.device} in {report.seconds:.2f} s")
    reduced = report.reduced
    if reduced:
        ranks = sorted(m.rank_out for m in reduced)
        lines.append(f"ranks    {ranks[0]}..{ranks[-1]}, median {ranks[len(ranks) // 2]} "
                     f"(from {Counter(m.rank_in for m in reduced).most_common(1)[0][0]})")
        lines.append(f"quality  fro retained {report.fro_retained_file:.4f} over the file (energy-weighted); "
                     f"module mean {report.fro_retained_mean:.4f}, module min {report.fro_retained_min:.4f}; "
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
