"""What a reduction produced: plain, frozen data shared by the engine, the CLI, the store and the worker.

The JSON form (`Report.to_json()`) is the contract of `lorad reduce --json`; the store records the
same fields (per-module rows in `module_metrics`, the summary on the variant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileInfo:
    path: str
    sha256: str
    bytes: int
    format: str | None = None  # input only: detected format id, e.g. "kohya", "diffusers", "peft"
    modules: int | None = None  # input only: LoRA-like modules found (reduced + skipped)


@dataclass(frozen=True)
class ModuleReport:
    name: str  # module name as the file spells it (key prefix before the role suffix)
    kind: str  # "linear", "conv1x1", "conv3x3" (any kxk), or the skipped kind: "loha", "lokr", ...
    rank_in: int
    rank_out: int
    fro_retained: float  # ||dW_k||_F / ||dW||_F from the exact spectrum (a norm ratio, not energy)
    energy_retained: float  # fro_retained ** 2
    rel_error: float  # ||dW - dW'||_F / ||dW||_F measured on the written (dtype-cast) factors
    params_in: int
    params_out: int
    bytes_in: int
    bytes_out: int
    skipped: str | None = None  # reason when passed through unchanged, else None
    norm: float | None = None  # ||dW||_F of the original module as its format reads it (None: skipped)


@dataclass(frozen=True)
class Spectrum:
    """A module's singular values (as its format reads it, descending) and how many were kept."""

    name: str
    values: tuple[float, ...]
    cut: int


@dataclass(frozen=True)
class Report:
    input: FileInfo
    output: FileInfo | None  # None for `plan` (nothing written)
    method: str
    param: float | None
    seconds: float
    device: str
    modules: tuple[ModuleReport, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = ()  # file-level remarks, e.g. "budget met: 12.0 MiB <= 12.5 MiB"
    spectra: tuple[Spectrum, ...] = ()  # of the largest modules (by norm), for reports
    rank_rule: str | None = None  # the serving rank rule applied (lorad.engine.reduce.rank_rules), if any
    serve: str | None = None

    @property
    def reduced(self) -> tuple[ModuleReport, ...]:
        return tuple(m for m in self.modules if m.skipped is None)

    @property
    def fro_retained_mean(self) -> float | None:
        kept = [m.fro_retained for m in self.reduced]
        return sum(kept) / len(kept) if kept else None

    @property
    def fro_retained_min(self) -> float | None:
        kept = [m.fro_retained for m in self.reduced]
        return min(kept) if kept else None

    @property
    def fro_retained_file(self) -> float | None:
        """||dW_k|| / ||dW|| over the whole file: each module weighted by its energy, as "keeps 90 %"
        reads. Skipped modules are unchanged and not counted."""
        kept = [m for m in self.reduced if m.norm is not None]
        total = sum(m.norm**2 for m in kept)
        if not kept:
            return None
        if total == 0.0:
            return 1.0
        return (sum((m.fro_retained * m.norm) ** 2 for m in kept) / total) ** 0.5

    @property
    def params_in(self) -> int:
        return sum(m.params_in for m in self.modules)

    @property
    def params_out(self) -> int:
        return sum(m.params_out for m in self.modules)

    def to_json(self) -> dict[str, Any]:
        """The `lorad reduce --json` object (a superset of the documented keys)."""
        return {
            "input": asdict(self.input),
            "output": asdict(self.output) if self.output else None,
            "method": self.method,
            "param": self.param,
            "seconds": round(self.seconds, 4),
            "device": self.device,
            "modules": [asdict(m) for m in self.modules],
            "fro_retained_mean": self.fro_retained_mean,
            "fro_retained_min": self.fro_retained_min,
            "fro_retained_file": self.fro_retained_file,
            "params_in": self.params_in,
            "params_out": self.params_out,
            "notes": list(self.notes),
            "rank_rule": self.rank_rule,
            "serve": self.serve,
            "spectra": [asdict(sp) for sp in self.spectra],
        }
