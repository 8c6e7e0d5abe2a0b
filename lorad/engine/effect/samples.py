"""The sample set: which inputs a measurement runs, with defaults built in.

A set is a plain JSON-able dict, recorded with the result so the same figures can be measured again
(and compared only with figures of the same `samples_id`). Checked here, filled in by the runners
with what they observed (the resolved image size, the timesteps the scheduler used, the token ids).
"""

from __future__ import annotations

import hashlib
import json

from lorad.errors import LoradError

# Three prompts of different subjects and seeds, so one LoRA's narrow effect is seen more than once.
DEFAULT_PROMPTS = (
    "a photograph of a woman standing in a garden, soft daylight",
    "a detailed painting of a city street at night, rain, neon signs",
    "a close-up of an old man's face, dramatic lighting",
)
# Denoiser calls 0, 1, 2 of a 4-step schedule: high, middle and low noise, and the hook stops the
# pipeline after the third call, so a sample costs three denoiser calls and no decoding.
DEFAULT_STEPS = 4
DEFAULT_CALLS = (0, 1, 2)

# Causal LM: these texts when the base folder has a tokenizer, else seeded ids within the vocabulary.
DEFAULT_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Then it ran into the forest and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: What is the capital of France?\nAnswer: The capital of France is",
)
DEFAULT_TOKEN_SEED = 0
DEFAULT_TOKEN_LENGTH = 16


def samples_id(samples: dict) -> str:
    """First 16 hex of sha256 of the canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(samples, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def denoiser_samples(given: dict | None) -> dict:
    """The denoiser set, defaults filled in: prompts[i] runs with seeds[i]; `calls` are indices of
    the denoiser's calls (one per step in the usual pipelines) whose outputs are compared.
    height/width None: the pipeline's default size (the runner records the size it used)."""
    given = _checked(given, "denoiser", _DENOISER_KEYS)
    prompts = list(given.get("prompts", DEFAULT_PROMPTS))
    seeds = list(given.get("seeds", range(1, len(prompts) + 1)))
    steps = given.get("num_inference_steps", DEFAULT_STEPS)
    calls = sorted(set(given.get("calls", DEFAULT_CALLS)))
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise LoradError("samples: prompts must be a non-empty list of strings")
    if len(seeds) != len(prompts) or not all(isinstance(s, int) for s in seeds):
        raise LoradError("samples: seeds must be one integer per prompt")
    if not isinstance(steps, int) or steps < 1:
        raise LoradError("samples: num_inference_steps must be a positive integer")
    if not calls or not all(isinstance(c, int) and c >= 0 for c in calls):
        raise LoradError("samples: calls must be a non-empty list of denoiser call indices (0, 1, ...)")
    size = {k: given.get(k) for k in ("height", "width")}
    if not all(v is None or (isinstance(v, int) and v > 0) for v in size.values()):
        raise LoradError("samples: height and width must be positive integers")
    out = {"kind": "denoiser", "prompts": prompts, "seeds": seeds, "num_inference_steps": steps,
           "calls": calls, **size}  # fmt: skip
    if given.get("guidance_scale") is not None:  # else the pipeline's own default
        out["guidance_scale"] = float(given["guidance_scale"])
    return out


def logits_samples(given: dict | None) -> dict:
    """The causal-LM set as asked: explicit `token_ids` (lists of ints), or `texts` (tokenized when
    the base has a tokenizer), else `seed`/`length` for seeded ids. The runner fills in token_ids."""
    given = _checked(given, "logits", _LOGITS_KEYS)
    ids = given.get("token_ids")
    if ids is not None:  # a recorded set given back: the ids decide, the rest stays as recorded
        if not ids or not all(isinstance(seq, list) and seq and all(isinstance(t, int) and t >= 0 for t in seq)
                              for seq in ids):  # fmt: skip
            raise LoradError("samples: token_ids must be non-empty lists of non-negative integers")
        return {**given, "kind": "logits"}
    texts = list(given.get("texts", DEFAULT_TEXTS))
    seed, length = given.get("seed", DEFAULT_TOKEN_SEED), given.get("length", DEFAULT_TOKEN_LENGTH)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise LoradError("samples: texts must be a non-empty list of strings")
    if not isinstance(seed, int) or not isinstance(length, int) or length < 1:
        raise LoradError("samples: seed and length must be integers (length >= 1)")
    return {"kind": "logits", "texts": texts, "seed": seed, "length": length}


# What a set may hold; "timesteps" is what a runner observed, accepted so a recorded set can be
# given back (it is measured again, not trusted).
_DENOISER_KEYS = {"kind", "prompts", "seeds", "num_inference_steps", "calls", "height", "width",
                  "guidance_scale", "timesteps"}  # fmt: skip
_LOGITS_KEYS = {"kind", "texts", "seed", "length", "token_ids"}


def _checked(given: dict | None, kind: str, allowed: set[str]) -> dict:
    given = dict(given or {})
    if given.get("kind", kind) != kind:
        raise LoradError(f"samples of kind {given['kind']!r} given for a {kind} measurement")
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise LoradError(f"samples: unknown keys {unknown} for a {kind} measurement (known: {sorted(allowed)})")
    return given
