"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors) as one LoRA: when a
folder is one, and when it is complete and consistent enough to take.

A folder is taken only when all of these hold (`check`, torch-free, cheap enough for every look):
  - it is a flat folder of regular files (lorad.library.trees) and not a watched root itself;
  - no download marker (.part, .crdownload, .aria2, .incomplete, .tmp) lies in it;
  - adapter_config.json parses and is a LORA config; adapter_model.safetensors' header is complete;
  - every LoRA module's rank as PEFT will build it (rank_pattern, else r) is its tensors' rank.
Then, once, the daemon runs lorad.engine.formats.lora.open_lora on it in a short-lived process
(lorad.daemon.folder_check: the daemon itself never imports torch) and refuses what that refuses.

A folder copied file by file (config first or weights first) fails one of these until the copy is
done, and is refused as incomplete meanwhile, which the watcher looks at again when it changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lorad._fileio import open_regular
from lorad.engine.formats.keys import group_keys
from lorad.engine.formats.safetensors_file import read_header
from lorad.engine.formats.scales import config_path, peft_rank
from lorad.errors import FormatError, IncompleteError, PickleError
from lorad.library.refusals import INVALID, Refusal, leads_outside, refusal_of
from lorad.library.trees import entries_of

CONFIG = "adapter_config.json"  # lorad.engine.formats.lora.PEFT_CONFIG (that module loads torch)
WEIGHTS = "adapter_model.safetensors"
PEFT_NAMES = (CONFIG, WEIGHTS)
PARTIAL_SUFFIXES = (".part", ".crdownload", ".aria2", ".incomplete", ".tmp")
MAX_CONFIG_BYTES = 1 << 20


def looks_like_adapter(folder: Path) -> bool:
    """A folder holding either PEFT file: an adapter folder, complete or still arriving."""
    return any(os.path.lexists(folder / name) for name in PEFT_NAMES)


def partial_markers(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if n.endswith(PARTIAL_SUFFIXES))
    except OSError:
        return []


def read_config(folder: Path) -> dict:  # type: ignore[type-arg]
    path = folder / CONFIG
    try:
        with open_regular(path) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise IncompleteError(f"{folder}: no {CONFIG} (yet); an adapter folder needs both {CONFIG} and {WEIGHTS}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise FormatError(f"{path}: over {MAX_CONFIG_BYTES} bytes; not an adapter config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompleteError(f"{path}: not complete JSON ({e}); still being written?") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(f"{path}: not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    return config


def check(folder: Path) -> None:
    """Raise FormatError (IncompleteError for what may still be arriving, PickleError, NotFlatFolder)
    unless `folder` is a complete, consistent PEFT LoRA folder. Torch-free."""
    names = {e.name for e in entries_of(folder)}
    if WEIGHTS not in names:
        if "adapter_model.bin" in names:
            raise PickleError(f"{folder}: adapter_model.bin is a pickle; lorad never unpickles (save with safetensors)")
        raise IncompleteError(f"{folder}: no {WEIGHTS} (yet); an adapter folder needs both {CONFIG} and {WEIGHTS}")
    config = read_config(folder)
    header = read_header(folder / WEIGHTS)
    groups, _ = group_keys(header.tensors)
    wrong = []
    for name, group in groups.items():
        roles = group.roles
        if "up" not in roles or "down" not in roles:
            continue
        shape = header.tensors[roles["down"]].shape
        if not shape:
            continue
        stated = peft_rank(config, config_path(name, True))
        if stated != shape[0]:
            wrong.append(f"{config_path(name, True)}: config {stated}, tensors {shape[0]}")
    if wrong:
        raise IncompleteError(
            f"{folder}: {CONFIG} and {WEIGHTS} disagree on {len(wrong)} module rank(s) ({wrong[0]}); PEFT refuses "
            "such a folder"
        )


def refusal(folder: Path, roots: Sequence[Path] = ()) -> Refusal | str | None:
    """The watcher's look at a candidate folder: None (take it), "wait" (a download marker inside),
    or why not. A folder that vanished raises FileNotFoundError to the caller."""
    real = Path(os.path.realpath(folder))
    if any(real == r for r in roots):
        return Refusal(INVALID, "a watched folder itself is not taken as an adapter folder; put the adapter in a subfolder")
    if roots:
        outside = leads_outside(folder, roots)
        if outside is not None:
            return outside
    if partial_markers(folder):
        return "wait"
    try:
        check(folder)
    except FileNotFoundError:
        raise
    except (FormatError, OSError) as e:
        return refusal_of(e, folder)
    return None
