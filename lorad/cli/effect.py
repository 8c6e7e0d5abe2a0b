"""`lorad effect`: how much of a LoRA's effect another file keeps, on the user's own base model.

Two inputs (ORIGINAL OTHER) run the engine directly, no daemon needed, as `lorad reduce` does. One
input (PATH|ID) is the daemon form (a stored LoRA and its variant); `_daemon_effect` handles it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorad.cli._compare_options import add_daemon_form, add_device, add_inputs
from lorad.cli.control import socket_path, target_of
from lorad.errors import LoradError

# lorad.engine.effect's runners (torch, diffusers, transformers) load inside the command, so
# `lorad status` and friends start fast.


def register(sub: argparse._SubParsersAction) -> None:
    help_text = "measure how much of a LoRA's effect on a base model another file keeps"
    p = sub.add_parser("effect", help=help_text, description=help_text + (
        ": effect = output(base + LoRA) - output(base) on a fixed set of samples (the denoiser's output "
        "for a diffusers pipeline, next-token logits for a causal LM with PEFT adapter folders); "
        "effect_retained = 1 - ||effect_other - effect_original|| / ||effect_original||"))  # fmt: skip
    add_inputs(p, "ORIGINAL OTHER: two LoRA .safetensors files (or PEFT adapter folders for a causal LM), "
                  "measured without the daemon; or one PATH|ID: a LoRA the daemon holds, its variant measured "
                  "here and recorded with it",
               "the base model: a diffusers pipeline folder, a single-file .safetensors checkpoint (with "
               "--config), or a transformers causal-LM folder")  # fmt: skip
    add_device(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_daemon_form(p, "measure")
    p.set_defaults(func=_effect)


def _effect(args: argparse.Namespace) -> int:
    if len(args.input) == 1:
        return _daemon_effect(args)
    if len(args.input) != 2:
        raise LoradError("lorad effect takes ORIGINAL OTHER (two files), or one PATH|ID (the daemon form)")
    if args.base is None:
        raise LoradError("lorad effect needs --base MODEL (the base model the LoRAs are for)")
    # transformers warns at import about optional backends (torchvision); not the user's concern here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from lorad.engine.effect import measure_effect

    original, other = (Path(p) for p in args.input)
    result = measure_effect(original, other, args.base, device=args.device, config=args.config)
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_summary(result, original, other))
    return 0


def _daemon_effect(args: argparse.Namespace) -> int:
    """`lorad effect PATH|ID [--variant N]`: a stored LoRA's variant against the variant it was made
    from, recorded with the variant (shown by `list`, `show` and the report).

    The daemon names the stored files (`effect_files`: the variant, by default the active one, else
    the newest reduction, and its original); they are measured here, in this process, so the daemon
    never loads a base model. The store's read-only blobs are read in place through a private temp
    folder of symlinks under the LoRA's own names (an adapter folder's files, as a folder); nothing
    is copied. The figures go back with `record_effect`. The socket: --socket, else $LORAD_SOCKET,
    else the default path (--config here is the base model's config folder, not the daemon's).
    """
    import tempfile

    if args.base is None:
        raise LoradError("lorad effect needs --base MODEL (the base model the LoRA is for)")
    call = daemon_caller(args)
    files = call("effect_files", target=target_of(args.input[0]), variant=args.variant)
    variant, reference = files["variant"], files["reference"]

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from lorad.engine.effect import measure_effect

    with tempfile.TemporaryDirectory(prefix="lorad-effect-") as tmp:
        original = assemble_stored(reference, Path(tmp) / "reference")
        other = assemble_stored(variant, Path(tmp) / "variant")
        result = measure_effect(original, other, args.base, device=args.device, config=args.config)
    recorded = call("record_effect", target=files["lora"], variant=variant["id"], reference=reference["id"],
                    effect=result.to_json())  # fmt: skip
    if args.json:
        doc = {**result.to_json(), "lora": files["lora"], "path": files["path"], "variant": variant["id"],
               "reference_variant": reference["id"], "recorded": recorded["effect"]}  # fmt: skip
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
        return 0

    summary = format_summary(result, Path(files["path"]), Path(files["path"])).splitlines()[2:]
    lines = [f"lora      {files['path']}  (id {files['lora']})",
             f"variant   {variant_label(variant)}, compared with {variant_label(reference)}", *summary,
             "recorded  with the variant (lorad list, show and report show it)"]  # fmt: skip
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def daemon_caller(args: argparse.Namespace):  # -> Callable[..., dict]
    """call(method, **params) on the daemon's socket: --socket, else $LORAD_SOCKET, else the default
    path (--config in these commands is the base model's config folder, not the daemon's). With
    --json, an error reply is printed as JSON too. One connection per call: a measurement or a
    render may outlast the daemon's idle timeout."""
    from lorad.daemon.control.client import Client
    from lorad.daemon.control.protocol import ControlError

    where = socket_path(argparse.Namespace(socket=args.socket, config=None))

    def call(method: str, **params: object) -> dict:
        try:
            with Client(where) as client:
                return client.call(method, **params)
        except ControlError as e:
            if args.json:
                print(json.dumps({"error": {"code": e.code, "message": e.message}}))
            raise

    return call


def assemble_stored(stored: dict, into: Path) -> Path:
    """A symlink (or a folder of them) named as the LoRA, to the stored blobs that `effect_files`
    named (one variant's): the store's read-only files read in place, nothing copied."""
    into.mkdir()
    for f in stored["files"]:
        name = f["name"]
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise LoradError(f"the daemon named a stored file {name!r}; refusing it")
        if not os.access(f["path"], os.R_OK):
            raise LoradError(f"cannot read the store's copy of variant {stored['id']} ({f['path']}): run the command "
                             "as the daemon's user or a member of its operator group, or compare two files "
                             "directly (`lorad effect ORIGINAL OTHER --base MODEL`)")  # fmt: skip
    if not stored["folder"]:
        [f] = stored["files"]
        link = into / f["name"]
        os.symlink(f["path"], link)
        return link
    folder = into / (stored["name"] or "adapter")
    folder.mkdir()
    for f in stored["files"]:
        os.symlink(f["path"], folder / f["name"])
    return folder


def variant_label(v: dict) -> str:
    if v["kind"] == "original":
        return f"#{v['id']} original"
    param = "" if v["param"] is None else f"{v['param']:g}"
    return f"#{v['id']} {v['method'] or 'reduced'}{param}"


def format_summary(result, original: Path, other: Path) -> str:  # result: EffectResult
    s = result.samples
    if result.kind == "denoiser":
        what = (f"{len(s['prompts'])} prompts x denoiser calls {s['calls']} of {s['num_inference_steps']} steps "
                f"({s['height']}x{s['width']})")
    else:
        what = f"{len(s['token_ids'])} sequences, {sum(len(q) for q in s['token_ids'])} tokens"
    lines = [
        f"original  {original}",
        f"other     {other}",
        f"base      {result.base}  (sha256 {result.base_sha256[:16]})",
        f"effect retained  {result.effect_retained:.4f} mean, {result.effect_retained_min:.4f} worst "
        f"({result.kind}; 1 = the same effect)",
    ]
    if result.kl_mean is not None:
        lines.append(f"KL divergence    {result.kl_mean:.3g} per token (original || other)")
    lines.append(f"samples   {what}, id {result.samples_id}")
    lines.append(f"time      {result.seconds:.1f} s")
    return "\n".join(lines) + "\n"
