"""Effect measurements in the library: what `lorad effect` measured for a variant, checked before
it is recorded, and which stored files a measurement compares.

A measurement (lorad.engine.effect's EffectResult, as its JSON crossed the socket) compares a
variant with its reference, the variant it was made from (its original, as a rule), on a base model
and a sample set: `effect_retained = 1 - ||effect_variant - effect_reference|| / ||effect_reference||`
per sample, the mean and the worst. It is at most 1 and any finite number below (a variant that
misses by more than the whole effect is below 0). One row per (variant, base sha256, sample set
id): measuring again on the same base and samples replaces the row; `list`, `show` and the report
show a variant's latest measurement.

The library never loads a base model: the CLI measures in its own process, from the stored files
`sources` names, and hands the figures back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad.errors import LoradError
from lorad.library.db.models import EFFECT_KINDS

MAX_SAMPLES_JSON = 32 * 1024  # the sample set as JSON text (prompts, seeds, timesteps)
MAX_PER_SAMPLE = 4096
MAX_BASE_CHARS = 4096
TOLERANCE = 1e-6  # float rounding between the figures a measurement reports
_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class EffectError(LoradError):
    """A measurement whose figures cannot be recorded as they are (named in the message)."""


@dataclass(frozen=True)
class Figures:
    """A checked measurement, ready to record."""

    kind: str
    effect_retained: float
    effect_retained_min: float
    per_sample: tuple[float, ...]
    kl_mean: float | None
    samples: str  # the sample set as canonical JSON text
    samples_id: str
    base: str
    base_sha256: str
    seconds: float | None


def _number(doc: Mapping[str, Any], key: str, *, optional: bool = False) -> float | None:
    value = doc.get(key)
    if value is None:
        if optional:
            return None
        raise EffectError(f"{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EffectError(f"{key} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise EffectError(f"{key} must be finite, got {value}")
    return value


def _retained(value: float, key: str) -> float:
    if value > 1.0:
        raise EffectError(f"{key} is at most 1 (1: the same effect), got {value!r}")
    return value


def parse(doc: Any) -> Figures:
    """Check an EffectResult's JSON (keys beyond its own are ignored) and return what is recorded;
    raise EffectError naming the first thing wrong."""
    if not isinstance(doc, Mapping):
        raise EffectError("the measurement must be a JSON object")
    kind = doc.get("kind")
    if kind not in EFFECT_KINDS:
        raise EffectError(f"kind must be one of {', '.join(EFFECT_KINDS)}, got {kind!r}")
    mean = _retained(_number(doc, "effect_retained"), "effect_retained")  # type: ignore[arg-type]
    worst = _retained(_number(doc, "effect_retained_min"), "effect_retained_min")  # type: ignore[arg-type]
    if worst > mean + TOLERANCE:
        raise EffectError(f"effect_retained_min ({worst!r}) is above the mean effect_retained ({mean!r})")
    per_sample_doc = doc.get("per_sample")
    if not isinstance(per_sample_doc, list) or not 1 <= len(per_sample_doc) <= MAX_PER_SAMPLE:
        raise EffectError(f"per_sample must be a list of 1 to {MAX_PER_SAMPLE} numbers")
    per_sample = tuple(_retained(_number({"per_sample": x}, "per_sample"), "per_sample")  # type: ignore[arg-type]
                       for x in per_sample_doc)  # fmt: skip
    if abs(min(per_sample) - worst) > TOLERANCE * max(1.0, abs(worst)):
        raise EffectError(f"effect_retained_min ({worst!r}) is not the worst of per_sample ({min(per_sample)!r})")
    average = math.fsum(per_sample) / len(per_sample)
    if abs(average - mean) > TOLERANCE * max(1.0, abs(mean)):
        raise EffectError(f"effect_retained ({mean!r}) is not the mean of per_sample ({average!r})")
    kl = _number(doc, "kl_mean", optional=True)
    if kl is not None and kl < -TOLERANCE:
        raise EffectError(f"kl_mean is never negative, got {kl!r}")
    seconds = _number(doc, "seconds", optional=True)
    if seconds is not None and seconds < 0:
        raise EffectError(f"seconds must not be negative, got {seconds!r}")
    samples_doc = doc.get("samples")
    if not isinstance(samples_doc, Mapping):
        raise EffectError("samples must be a JSON object (the sample set)")
    try:  # canonical JSON, as the sample set id is the sha256 of (lorad.engine.effect.samples)
        samples = json.dumps(samples_doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise EffectError(f"samples cannot be recorded as JSON: {e}") from None
    try:
        samples_bytes = samples.encode("utf-8")
    except UnicodeEncodeError:
        raise EffectError("samples holds a lone surrogate (not a character)") from None
    if len(samples_bytes) > MAX_SAMPLES_JSON:
        raise EffectError(f"samples is over {MAX_SAMPLES_JSON} bytes of JSON")
    samples_id, base_sha256, base = doc.get("samples_id"), doc.get("base_sha256"), doc.get("base")
    if not isinstance(samples_id, str) or not _HEX16.fullmatch(samples_id):
        raise EffectError("samples_id must be 16 lower-case hex digits")
    if hashlib.sha256(samples_bytes).hexdigest()[:16] != samples_id:
        raise EffectError("samples_id is not the id of samples (the sha256 of its canonical JSON)")
    if not isinstance(base_sha256, str) or not _HEX64.fullmatch(base_sha256):
        raise EffectError("base_sha256 must be 64 lower-case hex digits (a sha256)")
    if not isinstance(base, str) or not base.strip() or "\0" in base or len(base) > MAX_BASE_CHARS:
        raise EffectError(f"base must be the base model's path (non-empty text of at most {MAX_BASE_CHARS} characters)")
    try:
        os.fsencode(base)  # a name's undecodable bytes travel escaped (os.fsdecode); nothing else
    except UnicodeEncodeError:
        raise EffectError("base holds a lone surrogate that is not an escaped byte") from None
    return Figures(kind, mean, worst, per_sample, kl, samples, samples_id, base, base_sha256, seconds)


@dataclass(frozen=True)
class Stored:
    """One variant's stored files, as a measurement reads them: `name` is the LoRA's own name
    (its file's, or its adapter folder's), `files` (name, store path, mode) what it holds: one
    file named `name`, or the files of the folder `name`."""

    variant_id: int
    kind: str  # "original" | "reduced"
    method: str | None
    param: float | None
    sha256: str
    folder: bool
    name: str
    files: tuple[tuple[str, Path, int], ...]


@dataclass(frozen=True)
class Sources:
    """What `lorad effect` compares: a variant and its reference, of one LoRA."""

    lora_id: int
    path: Path
    variant: Stored
    reference: Stored
