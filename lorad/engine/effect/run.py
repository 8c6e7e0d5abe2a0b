"""measure_effect's body: check the inputs, pick the device, run the base's runner, hash the base,
and put the figures together. The hash comes last, so a LoRA that does not fit is told at once (the
loader has just read the files, so the hash mostly reads the page cache)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorad.engine.effect._deps import require
from lorad.engine.effect.base import CAUSAL_LM, base_sha256, describe_base
from lorad.engine.effect.loras import check_lora
from lorad.engine.effect.measure import summary
from lorad.engine.effect.result import EffectResult
from lorad.engine.effect.samples import samples_id
from lorad.errors import LoradError


def measure(original: Path, other: Path, base: Path, *, samples: dict | None, device: str | None,
            config: Path | None) -> EffectResult:
    started = time.perf_counter()
    model = describe_base(base, config)
    llm = model.kind == CAUSAL_LM
    for path in (original, other):
        check_lora(path, folder_wanted=llm)
    require("peft", "transformers", *(() if llm else ("diffusers",)))
    device = _device(device)
    if llm:
        from lorad.engine.effect import causal_lm

        per_sample, kl, recorded = causal_lm.run(original, other, model, samples, device)
    else:
        from lorad.engine.effect import diffusion

        per_sample, recorded = diffusion.run(original, other, model, samples, device)
        kl = None
    mean, worst = summary(per_sample)
    return EffectResult(
        effect_retained=mean, effect_retained_min=worst, per_sample=tuple(per_sample),
        kind="logits" if llm else "denoiser", kl_mean=kl, samples=recorded, samples_id=samples_id(recorded),
        base=str(base), base_sha256=base_sha256(model), seconds=time.perf_counter() - started,
    )  # fmt: skip


def _device(requested: str | None) -> str:
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise LoradError("--device cuda asked for, but torch sees no CUDA device (a CPU build of torch?)")
    return requested
