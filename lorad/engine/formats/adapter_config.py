"""The LoraConfig fields lorad writes: diffusers' minimal `lora_adapter_metadata` and a PEFT
folder's adapter_config.json. Both tell PEFT each module's rank and alpha through r / lora_alpha
plus rank_pattern / alpha_pattern, so both come from one function.

Every LoRA module of the file is described, the ones lorad passed through included: PEFT builds
each layer at the rank its config says and refuses tensors of any other, and scales it by the
alpha its config says.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any


def lora_fields(modules: dict[str, tuple[int, float]]) -> dict[str, Any]:
    """r, lora_alpha, target_modules, rank_pattern, alpha_pattern for {module path: (rank, alpha)}."""
    ranks = {path: rank for path, (rank, _) in modules.items()}
    alphas = {path: _plain(alpha) for path, (_, alpha) in modules.items()}
    r = _most_common(ranks.values())
    lora_alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": sorted(modules),
        "rank_pattern": patterns(ranks, r),
        "alpha_pattern": patterns(alphas, lora_alpha),
    }


def patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """The pattern dict PEFT reads as intended: an entry for each module whose value is not the
    default, plus one for any module that another entry would match by suffix, longest first.

    PEFT takes the FIRST key with re.match(rf"(.*\\.)?({key})$", name): the key for
    "layers.1.q" also matches "decoder.layers.1.q", which must then have its own, earlier entry.
    """
    chosen = {path: v for path, v in values.items() if v != default}
    if chosen:
        tails: dict[str, list[str]] = {}
        for key in chosen:
            tails.setdefault(key.rsplit(".", 1)[-1], []).append(key)
        for path, v in values.items():
            if path in chosen:
                continue
            for key in tails.get(path.rsplit(".", 1)[-1], ()):
                if re.match(rf"(.*\.)?({key})$", path):
                    chosen[path] = v
                    break
    return dict(sorted(chosen.items(), key=lambda kv: (-len(kv[0]), kv[0])))


def _most_common(values) -> Any:  # type: ignore[no-untyped-def]
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)  # ties: the smallest, deterministically


def _plain(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
