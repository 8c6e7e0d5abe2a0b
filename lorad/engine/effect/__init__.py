"""How much of a LoRA's effect a variant keeps, measured on the user's own base model.

effect = output(base + LoRA) - output(base) at the same inputs, for the original and for the other
file, and `effect_retained = 1 - ||e_other - e_orig|| / ||e_orig||` per sample (mean and worst).
The output is the denoiser's (a diffusers pipeline) or the next-token logits (a transformers causal
LM with PEFT adapter folders).

Layout: `measure` (the formula, tensors only), `samples` (the recorded sample set), `base` (what the
base model is and its hash), `loras` (input checks), `diffusion` and `causal_lm` (the runners),
`run` (the face). This file loads neither torch nor diffusers: the daemon side may import
EffectResult; `measure_effect` loads the rest when called.
"""

from __future__ import annotations

from pathlib import Path

from lorad.engine.effect.result import EffectResult

__all__ = ["EffectResult", "measure_effect"]


def measure_effect(original: Path, other: Path, base: Path, *, samples: dict | None = None,
                   device: str | None = None, config: Path | None = None) -> EffectResult:
    """Measure how much of ORIGINAL's effect on BASE the OTHER file keeps.

    base: a diffusers pipeline folder (model_index.json), a single-file checkpoint (.safetensors)
    with `config` (a local diffusers config folder), or a transformers causal-LM folder (then the
    LoRAs are PEFT adapter folders). samples: None for the built-in set (recorded in the result).
    device: None picks "cuda" when torch sees one, else "cpu". Raises LoradError for anything the
    user can act on (a missing or wrong base, a pickle, a LoRA that fits nothing in the base).
    """
    from lorad.engine.effect.run import measure

    return measure(Path(original), Path(other), Path(base), samples=samples, device=device,
                   config=None if config is None else Path(config))
