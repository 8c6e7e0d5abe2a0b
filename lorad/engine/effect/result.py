"""The figures of one effect measurement, as the CLI prints them and the library stores them.

No torch here: the daemon side imports this without loading the engine's heavy parts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EffectResult:
    effect_retained: float  # mean over samples of 1 - ||e_other - e_orig|| / ||e_orig||
    effect_retained_min: float  # the worst sample
    per_sample: tuple[float, ...]
    kind: str  # "denoiser" (diffusers pipeline) or "logits" (causal LM)
    kl_mean: float | None  # logits only: mean over tokens of KL(p_original || p_other)
    samples: dict  # the sample set as recorded (JSON-able), so a measurement can be repeated
    samples_id: str  # first 16 hex of sha256 of the canonical JSON of `samples`
    base: str  # the base model path as given
    base_sha256: str  # sha256 over the base's files (name, size, sha256 of each)
    seconds: float

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["per_sample"] = list(self.per_sample)
        return doc
