"""`lorad preview`: pictures rendered with the original and with a variant from the same seeds, side
by side with a difference image and SSIM, in the HTML report.

One input (PATH|ID) is the daemon form: the daemon names the stored original and variant
(`effect_files`, as for `lorad effect`) and returns the LoRA's report document (`report`, as for
`lorad report`); the pictures are rendered here, in this process (the daemon never loads a base
model), and the report is written with a Preview section, by default as `<stem>.report.html` in
the current directory. Nothing is recorded. Two inputs (ORIGINAL OTHER) need no daemon and write a
page with the Preview section alone, by default `<other's stem>.preview.html`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from lorad.cli._compare_options import add_daemon_form, add_device, add_inputs
from lorad.errors import LoradError


def register(sub: argparse._SubParsersAction) -> None:
    help_text = "render pictures with a LoRA and its variant from the same seeds, side by side, into the report"
    p = sub.add_parser("preview", help=help_text, description=help_text + (
        ": per prompt and seed the original's picture, the variant's and their difference (|a - b| x 4), with "
        "the SSIM of the pair; the HTML report of the LoRA (PATH|ID) or a page of its own (ORIGINAL OTHER)"))  # fmt: skip
    add_inputs(p, "ORIGINAL OTHER: two LoRA .safetensors files, without the daemon; or one PATH|ID: a LoRA the "
                  "daemon holds, its variant against the original",
               "the base model: a diffusers pipeline folder, or a single-file .safetensors checkpoint (with "
               "--config)")  # fmt: skip
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeat for several; default: two built-in prompts)")
    p.add_argument("--seeds", type=int, metavar="N", help="render each prompt with seeds 1..N (default 2)")
    p.add_argument("--steps", type=int, metavar="N", help="inference steps per picture (default 12)")
    p.add_argument("--size", type=int, metavar="PX",
                   help="picture height and width in pixels (default: the pipeline's own size)")
    p.add_argument("--guidance-scale", type=float, metavar="G", help="default: the pipeline's own")
    add_device(p)
    p.add_argument("-o", "--output", metavar="FILE.html",
                   help="the page to write (default: <stem>.report.html for PATH|ID, <other's stem>.preview.html "
                        "for two files, in the current directory)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures (SSIM per picture, mean) and the page's path")
    add_daemon_form(p, "show")
    p.set_defaults(func=_preview)


def _preview(args: argparse.Namespace) -> int:
    if len(args.input) not in (1, 2):
        raise LoradError("lorad preview takes ORIGINAL OTHER (two files), or one PATH|ID (the daemon form)")
    if args.base is None:
        raise LoradError("lorad preview needs --base MODEL (the base model the LoRA is for)")
    # transformers warns at import about optional backends (torchvision); not the user's concern here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return _daemon_preview(args) if len(args.input) == 1 else _files_preview(args)


def _render(args: argparse.Namespace, original: Path, other: Path):  # -> PreviewResult
    from lorad.engine.effect.preview import render_preview

    return render_preview(original, other, args.base, prompts=args.prompt, seeds=args.seeds, steps=args.steps,
                          size=args.size, guidance_scale=args.guidance_scale, device=args.device,
                          config=args.config)  # fmt: skip


def _files_preview(args: argparse.Namespace) -> int:
    from lorad.report.html import render_preview

    original, other = (Path(p) for p in args.input)
    result = _render(args, original, other)
    out = _output(args, f"{_stem(other.name)}.preview.html")
    doc = {"generated_at": _now(), "original": os.path.abspath(original), "other": os.path.abspath(other),
           "preview": result.to_doc()}  # fmt: skip
    _write(out, render_preview(doc))
    return _print(args, result, out, {"original": str(original), "other": str(other)})


def _daemon_preview(args: argparse.Namespace) -> int:
    import tempfile

    from lorad.cli.control import target_of
    from lorad.cli.effect import assemble_stored, daemon_caller, variant_label
    from lorad.cli.report import default_output
    from lorad.report.html import render_lora

    call = daemon_caller(args)
    files = call("effect_files", target=target_of(args.input[0]), variant=args.variant)
    variant, reference = files["variant"], files["reference"]
    if variant["folder"] or reference["folder"]:
        raise LoradError(f"{files['path']}: a PEFT adapter folder; lorad preview renders pictures with a "
                         "diffusers pipeline from single-file LoRAs (`lorad effect` measures an LLM adapter)")
    with tempfile.TemporaryDirectory(prefix="lorad-preview-") as tmp:
        original = assemble_stored(reference, Path(tmp) / "reference")
        other = assemble_stored(variant, Path(tmp) / "variant")
        result = _render(args, original, other)
    doc = call("report", target=files["lora"])  # after the render: the latest records
    doc = {**doc, "preview": {**result.to_doc(), "variant_id": variant["id"], "reference_id": reference["id"]}}
    out = _output(args, default_output(doc, False).name)
    _write(out, render_lora(doc))
    return _print(args, result, out, {"lora": files["lora"], "lora_path": files["path"], "variant": variant["id"],
                                      "reference_variant": reference["id"]},
                  f"{variant_label(variant)} against {variant_label(reference)}")  # fmt: skip


def _output(args: argparse.Namespace, default_name: str) -> Path:
    if args.output:
        return Path(os.path.abspath(os.path.expanduser(args.output)))
    return Path.cwd() / default_name


def _stem(name: str) -> str:
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else Path(name).stem or name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write(out: Path, html: str) -> None:
    from lorad.report.html import write_html

    try:
        write_html(out, html)
    except OSError as e:
        raise LoradError(f"cannot write {out}: {e.strerror or e}") from None


def _print(args: argparse.Namespace, result, out: Path, about: dict, what: str = "") -> int:
    if args.json:
        json.dump({**about, **result.figures(), "path": str(out)}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    lines = [f"{what}: " if what else ""]
    lines[0] += (f"SSIM {result.ssim_mean:.4f} mean, {result.ssim_min:.4f} worst over {len(result.pairs)} pictures "
                 f"({len(result.prompts)} prompts x {len(result.seeds)} seeds, {result.steps} steps, "
                 f"{result.width}x{result.height}, {result.seconds:.1f} s)")  # fmt: skip
    lines.append(f"wrote {out}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
