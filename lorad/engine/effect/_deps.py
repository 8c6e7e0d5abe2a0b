"""The heavy libraries, loaded only when a measurement runs, and the loaders' chatter kept quiet."""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Iterator

import torch

from lorad.errors import LoradError

_EXTRA = "pip install 'lorad[effect]'"


def require(*modules: str, what: str = "measuring a LoRA's effect") -> None:
    """Import each module, or say in one line what to install."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise LoradError(f"{what} needs {name} ({e}): {_EXTRA}") from None


@contextlib.contextmanager
def quiet(level: int = logging.ERROR) -> Iterator[None]:
    """diffusers/transformers logs and progress bars down to `level`, warnings off, then restored.

    Their loaders print bars and advice on every load; lorad says itself what went wrong, in one
    line (a LoRA that fits nothing is counted, not read from a log)."""
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in _loggers()]
    for lib, _, _ in saved:
        lib.set_verbosity(level)
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _loggers() -> list:
    """The logging modules of diffusers and transformers, those installed (an LLM user may lack diffusers)."""
    found = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def loaded_layers(modules: list[torch.nn.Module], adapter: str) -> int:
    """How many PEFT layers of these models carry `adapter`: 0 means the LoRA fit nothing."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for model in modules:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and any(
                adapter in getattr(layer, attr, ()) for attr in ("lora_A", "lora_embedding_A", "hada_w1_a", "lokr_w1")
            ):
                count += 1
    return count


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
