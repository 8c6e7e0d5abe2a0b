"""What `lorad reduce A.safetensors B.safetensors DIR/ -o OUTDIR` reduces, and where each output goes.

A folder stands for every LoRA under it: `*.safetensors` files and PEFT adapter folders (a folder
with adapter_config.json is one LoRA, never searched inside). Files lorad itself wrote (they carry
`lorad.source_sha256`) are left out of a folder, so running twice over one folder does not reduce
the reductions. With -o OUTDIR an output keeps its input's name and its path relative to the folder
it was found in, so OUTDIR can stand in for the folder in a tool's LoRA path; without -o each output
is written beside its input under the default name (`<stem>.<method><param>.safetensors`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorad._atomic import is_temp_name
from lorad.engine.formats.lora import PEFT_CONFIG
from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import FormatError, LoradError


@dataclass(frozen=True)
class Item:
    src: Path
    dst: Path | None  # None: the engine's default name beside the input
    skipped: str | None = None  # why this LoRA is left alone on purpose (then dst is None)
    error: str | None = None  # why this LoRA cannot be reduced in this run (then dst is None)


def is_batch(inputs: list[Path]) -> bool:
    """Several inputs, or one folder that is not itself a PEFT adapter."""
    return len(inputs) > 1 or (inputs[0].is_dir() and not (inputs[0] / PEFT_CONFIG).is_file())


def plan_batch(inputs: list[Path], outdir: Path | None, default_dst: Callable[[Path], Path]) -> list[Item]:
    items: list[Item] = []
    claimed: dict[Path, Path] = {}
    for given in inputs:
        if given.is_dir() and not (given / PEFT_CONFIG).is_file():
            found = list(_loras_under(given))
            if not found:
                raise LoradError(f"{given}: no .safetensors LoRA or PEFT adapter folder under it")
            for src, skipped in found:
                dst = None if skipped else _dst(src, src.relative_to(given), outdir, default_dst)
                items.append(_claim(Item(src, dst, skipped), claimed))
        else:
            dst = _dst(given, Path(given.name), outdir, default_dst)
            items.append(_claim(Item(given, dst), claimed))
    return items


def _dst(src: Path, rel: Path, outdir: Path | None, default_dst: Callable[[Path], Path]) -> Path:
    return default_dst(src) if outdir is None else outdir / rel


def _claim(item: Item, claimed: dict[Path, Path]) -> Item:
    if item.dst is None:
        return item
    key = Path(os.path.abspath(item.dst))
    if key in claimed:
        return Item(item.src, None, error=f"its output {item.dst} would overwrite the output of {claimed[key]}")
    if key == Path(os.path.abspath(item.src)):
        return Item(item.src, None, error="its output would overwrite the input; choose another -o")
    claimed[key] = item.src
    return item


def _loras_under(folder: Path) -> Iterator[tuple[Path, str | None]]:
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs.sort()
        for d in list(dirs):
            if (here / d / PEFT_CONFIG).is_file():
                dirs.remove(d)  # an adapter folder is one LoRA: not searched inside
                yield here / d, None
            elif d.startswith("."):
                dirs.remove(d)
        for name in sorted(files):
            path = here / name
            if name.endswith(".safetensors") and not name.startswith(".") and not is_temp_name(path):
                yield path, _written_by_lorad(path)


def _written_by_lorad(path: Path) -> str | None:
    try:
        if "lorad.source_sha256" in read_header(path).metadata:
            return "already a lorad output (it carries lorad.source_sha256)"
    except FormatError:
        return None  # the engine says what is wrong with it, in its own row
    return None
