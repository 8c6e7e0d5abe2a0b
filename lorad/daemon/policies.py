"""Reduction policies: `Policy` (what a reduction produces and when a variant is activated), its
`QualityCheck` (the gate on the LoRA's effect), and the validation of the config's `policies`
section, quality_check included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad.daemon._config_values import DEVICES, _bool, _choice, _fraction, _int, _number, _path
from lorad.daemon._config_yaml import _At, _Located, _mapping
from lorad.engine.reduce import rank_rules
from lorad.engine.reduce.methods import METHODS
from lorad.engine.reduce.methods import validate as validate_method
from lorad.errors import LoradError, ReduceError

EFFECT_EXTRA = "pip install 'lorad[effect]'"
ACTIVATE = ("auto", "manual")
DEFAULT_POLICY = "default"


@dataclass(frozen=True)
class QualityCheck:
    """A policy's gate on the LoRA's effect: after a reduction, the variant's effect on `base` is
    measured against the original's (lorad.engine.effect) and only a variant whose effect_retained
    (the mean over the samples) is at least `min_effect_retained` is activated."""

    base: Path  # a diffusers pipeline folder, a single-file checkpoint (with `config`), a causal-LM folder
    min_effect_retained: float
    config: Path | None = None  # a single-file checkpoint's local diffusers config folder
    device: str = "auto"  # auto: the job's own device


@dataclass(frozen=True)
class Policy:
    name: str
    method: str
    param: float | None = None
    max_rank: int | None = None
    budget_mb: float | None = None
    kohya_compat: bool = False
    min_saving: float = 0.10  # fraction of the original's bytes a variant must save to be activated
    # The whole file's retained Frobenius ratio (energy-weighted) a variant must keep to be activated.
    # None: no floor of its own. A built-in floor would second-guess the method: fro 0.9 with a
    # max_rank cap keeps less than 0.9 wherever the cap bites, by the user's own choice.
    min_fro_retained: float | None = None
    activate: str = "auto"  # auto: activate a variant that passes; manual: store it only
    keep_variants: int = 3  # reduced variants kept per LoRA (the original is always kept)
    # Rank rules for serving hosts (lorad.engine.reduce.rank_rules), applied after the method's choice.
    rank_multiple: int | None = None
    uniform: bool = False
    serve: str | None = None  # vllm, lorax or diffusers-hotswap: that server's preset
    # The effect gate (None: none). Not part of `hash`: it decides activation, not the bytes.
    quality_check: QualityCheck | None = None

    @property
    def hash(self) -> str:
        """Identity of what this policy produces: only the fields that change the variant's bytes."""
        doc = {
            "method": self.method,
            "param": self.param,
            "max_rank": self.max_rank,
            "budget_mb": self.budget_mb,
            "kohya_compat": self.kohya_compat,
        }
        rules = {"rank_multiple": self.rank_multiple, "uniform": self.uniform, "serve": self.serve}
        doc.update({k: v for k, v in rules.items() if v})  # unset rules leave older hashes as they were
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def default_policy() -> Policy:
    return Policy(name=DEFAULT_POLICY, method="fro", param=0.95)


_POLICY_KEYS = ("method", "param", "max_rank", "budget_mb", "kohya_compat", "min_saving",
                "min_fro_retained", "activate", "keep_variants", "rank_multiple", "uniform", "serve",
                "quality_check")  # fmt: skip
_QUALITY_KEYS = ("base", "min_effect_retained", "config", "device")


def _quality_check(value: Any, at: _At, base_dir: Path) -> QualityCheck | None:
    """`quality_check: {base, min_effect_retained, config?, device?}` (null or off: no gate). The
    base is classified from its files here (a header read, nothing loaded), and the libraries the
    measurement needs are looked for, so a gate that could never pass stops the daemon at start
    instead of refusing every variant."""
    if value is None or value is False or value == "off":
        return None
    doc = _mapping(value, at, _QUALITY_KEYS)
    for key in ("base", "min_effect_retained"):
        if key not in doc:
            raise at.error(f"a quality_check needs `{key}`" + (
                " (a diffusers pipeline folder, a single-file checkpoint with `config`, or a transformers "
                "causal-LM folder)" if key == "base" else " (e.g. 0.98: the variant keeps 98% of the LoRA's effect)"))
    floor_at = at.child(doc, "min_effect_retained")
    floor = doc["min_effect_retained"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor != floor:
        raise floor_at.error(f"expected a number at most 1, got {floor!r}")
    if floor > 1 or floor == float("-inf"):
        raise floor_at.error(f"must be a finite number at most 1 (1: the variant keeps the whole effect; "
                             f"effect_retained is never above 1), got {floor!r}")  # fmt: skip
    base = _path(doc["base"], at.child(doc, "base"), base_dir)
    folder = _path(doc["config"], at.child(doc, "config"), base_dir) if "config" in doc else None
    device = _choice(doc.get("device", "auto"), at.child(doc, "device"), DEVICES)
    # lorad.engine.effect.base reads file names and a safetensors header only (no torch).
    from lorad.engine.effect.base import CAUSAL_LM, describe_base

    try:
        kind = describe_base(base, folder).kind
    except LoradError as e:
        key = "config" if folder is not None and str(folder) in str(e) else "base"
        raise at.child(doc, key).error(str(e).replace("--config", "`config`")) from None
    import importlib.util

    needed = ("peft", "transformers", *(() if kind == CAUSAL_LM else ("diffusers",)))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise at.error(f"measuring the effect needs {', '.join(missing)}, not installed: {EFFECT_EXTRA} "
                       "(or remove quality_check)")  # fmt: skip
    return QualityCheck(base=base, min_effect_retained=float(floor), config=folder, device=device)


def _policy(name: str, value: Any, at: _At, base_dir: Path) -> Policy:
    doc = _mapping(value, at, _POLICY_KEYS)
    if "method" not in doc:
        raise at.error("a policy needs a `method` (" + ", ".join(METHODS) + ")")
    fields: dict[str, Any] = {"name": name}
    checks: dict[str, Callable[[Any, _At], Any]] = {
        "method": lambda v, a: _choice(v, a, METHODS),
        "param": lambda v, a: None if v is None else _number(v, a, 0),
        "max_rank": lambda v, a: None if v is None else _int(v, a, 1),
        "budget_mb": lambda v, a: None if v is None else _number(v, a, 0),
        "kohya_compat": _bool,
        "min_saving": _fraction,
        "min_fro_retained": lambda v, a: None if v is None else _fraction(v, a),
        "activate": lambda v, a: _choice(v, a, ACTIVATE),
        "keep_variants": lambda v, a: _int(v, a, 1),
        "rank_multiple": lambda v, a: None if v is None else _int(v, a, 1),
        "uniform": _bool,
        "serve": lambda v, a: None if v is None else _choice(v, a, rank_rules.SERVERS),
    }
    for key, check in checks.items():
        if key in doc:
            fields[key] = check(doc[key], at.child(doc, key))
    if "quality_check" in doc:
        fields["quality_check"] = _quality_check(doc["quality_check"], at.child(doc, "quality_check"), base_dir)
    policy = Policy(**fields)
    _check_method_param(policy, doc, at)
    try:
        rank_rules.rule_for(policy.serve, policy.rank_multiple, policy.uniform, policy.max_rank)
    except ReduceError as e:
        key = next((k for k in ("serve", "rank_multiple", "uniform") if k in doc), "max_rank")
        raise at.child(doc, key).error(str(e)) from None
    return policy


def _check_method_param(policy: Policy, doc: _Located, at: _At) -> None:
    """Each method's parameter, checked here so a typo fails at start, not on the first file."""
    where = at.child(doc, "param") if "param" in doc else at.child(doc, "method")
    if policy.method == "budget":
        where = at.child(doc, "budget_mb") if "budget_mb" in doc else at.child(doc, "method")
    try:
        validate_method(policy.method, policy.param, policy.budget_mb)
    except ReduceError as e:
        raise where.error(str(e)) from None


def _policies(value: Any, at: _At, base_dir: Path) -> dict[str, Policy]:
    doc = _mapping(value, at)
    if not doc:
        raise at.error("define at least one policy")
    return {name: _policy(name, doc[name], at.child(doc, name), base_dir) for name in doc}
