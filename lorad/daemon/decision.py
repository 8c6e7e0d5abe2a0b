"""The policy's decision on a new variant: pure (figures in, a Decision out).

Whether a variant becomes the file at the watched path, and why or why not, in words a user can act
on: a refusal names the setting (policies.<name>.<key>) and the value of it that would have let the
variant pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorad.daemon.config import Policy


@dataclass(frozen=True)
class Decision:
    activate: bool
    reason: str
    saving: float  # fraction of the original's bytes saved
    fro_retained: float | None  # the whole file's energy-weighted retained Frobenius ratio
    refused_by: str | None = None  # the policy setting that refused the variant
    would_pass: float | None = None  # the loosest value of that setting the variant fails, relaxed
    effect_retained: float | None = None  # the quality check's figure (mean over samples), if measured

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "activate": self.activate, "reason": self.reason, "saving": round(self.saving, 6),
            "fro_retained_file": self.fro_retained, "refused_by": self.refused_by, "would_pass": self.would_pass,
        }  # fmt: skip
        if self.effect_retained is not None:
            doc["effect_retained"] = self.effect_retained
        return doc


def _floor(x: float, digits: int) -> float:
    return math.floor(x * 10**digits) / 10**digits


def decide(policy: Policy, bytes_in: int, bytes_out: int, fro_retained: float | None,
           effect_retained: float | None = None, effect_error: str | None = None) -> Decision:  # fmt: skip
    """Whether a variant should be activated under `policy`, and why (or why not). A refusal names
    the setting (policies.<name>.<key>) and the value of it that would have let the variant pass.

    Under a quality_check, `effect_retained` is the measured figure (mean over the samples) and
    `effect_error` why there is none; a variant with no figure is never activated."""
    saving = 1.0 - bytes_out / bytes_in if bytes_in > 0 else 0.0
    fro_text = "n/a" if fro_retained is None else f"{fro_retained:.4f}"
    where = f"policies.{policy.name}"
    if saving < policy.min_saving:
        if saving > 0:
            passing: float | None = _floor(saving, 3)
            hint = f"min_saving {passing:.1%} or lower would have passed"
        else:
            passing, hint = None, "no min_saving passes a variant that is not smaller than its original"
        reason = (f"saves {saving:.1%}, less than min_saving {policy.min_saving:.1%} "
                  f"(set by {where}.min_saving); {hint}")  # fmt: skip
        return Decision(False, reason, saving, fro_retained, "min_saving", passing)
    floor = policy.min_fro_retained
    if floor is not None and (fro_retained is None or fro_retained < floor):
        if fro_retained is None:
            passing, hint = None, "the variant reports no retained norm; only removing the setting passes it"
        else:
            passing = _floor(fro_retained, 4)
            hint = f"min_fro_retained {passing:.4f} or lower would have passed"
        reason = (f"keeps {fro_text} of the file's Frobenius norm, less than min_fro_retained {floor} "
                  f"(set by {where}.min_fro_retained); {hint}")  # fmt: skip
        return Decision(False, reason, saving, fro_retained, "min_fro_retained", passing)
    gate, effect_text = policy.quality_check, ""
    if gate is not None:
        if effect_retained is None:
            why = effect_error or "no measurement came back"
            reason = (f"the quality check could not measure the LoRA's effect on {gate.base}, so the variant "
                      f"is not activated unchecked (set by {where}.quality_check): {why}")  # fmt: skip
            return Decision(False, reason, saving, fro_retained, "quality_check", None)
        shown = _floor(effect_retained, 4)
        if effect_retained < gate.min_effect_retained:
            reason = (f"effect_retained {shown:.4f} is below quality_check.min_effect_retained "
                      f"{gate.min_effect_retained:g} (set by {where}.quality_check.min_effect_retained); "
                      f"a min_effect_retained of {shown:.4f} or lower would have passed")  # fmt: skip
            return Decision(False, reason, saving, fro_retained, "quality_check.min_effect_retained", shown,
                            effect_retained)  # fmt: skip
        effect_text = f", effect_retained {shown:.4f} (quality_check.min_effect_retained {gate.min_effect_retained:g})"
    if policy.activate == "manual":
        reason = (f"passes (saves {saving:.1%}, keeps {fro_text}{effect_text}) but policy {policy.name} "
                  "activates manually")  # fmt: skip
        return Decision(False, reason, saving, fro_retained, "activate", None, effect_retained)
    return Decision(True, f"saves {saving:.1%}, keeps {fro_text} of the file's Frobenius norm{effect_text}",
                    saving, fro_retained, effect_retained=effect_retained)  # fmt: skip
