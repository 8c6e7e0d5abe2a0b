"""The two LoRAs given: checked before any model loads, so a wrong input costs nothing.

A file must be a whole safetensors file (a pickle is refused by the header reader, never loaded); a
folder must be a PEFT adapter folder (adapter_config.json + adapter_model.safetensors). Whether the
LoRA fits the base is for the loader to say (diffusers, PEFT): lorad's own format reader is not
asked, so any layout those loaders accept is measured.
"""

from __future__ import annotations

from pathlib import Path

from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import LoradError, PickleError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def check_lora(path: Path, folder_wanted: bool) -> None:
    """Raise LoradError unless `path` is a LoRA of the kind the base takes: a folder for a causal
    LM (folder_wanted), a .safetensors file for a diffusers pipeline."""
    if not path.exists():
        raise LoradError(f"{path}: not found")
    if path.is_dir():
        if not (path / ADAPTER_CONFIG).is_file():
            raise LoradError(f"{path}: a folder, but not a PEFT adapter (no {ADAPTER_CONFIG})")
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            if any((path / name).exists() for name in _PICKLE_WEIGHTS):
                raise PickleError(f"{path}: its adapter weights are a pickle; lorad never unpickles "
                                  "(save the adapter with safetensors)")
            raise LoradError(f"{path}: PEFT adapter folder without {ADAPTER_WEIGHTS}")
        read_header(weights)
        if not folder_wanted:
            raise LoradError(f"{path}: a PEFT adapter folder, but the base is a diffusers pipeline; "
                             "give the LoRA as one .safetensors file")
        return
    read_header(path)  # refuses a pickle (.ckpt/.pt/.bin) and a truncated or foreign file
    if folder_wanted:
        raise LoradError(f"{path}: a single file, but the base is a causal LM; give a PEFT adapter folder "
                         f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
