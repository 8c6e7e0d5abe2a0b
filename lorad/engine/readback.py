"""Read a just-written LoRA back the way each loader family reads it, and hold it to its report.

Run on the temp file before it is renamed into place: a file that any loader would read differently
from what the report says is never published. Checked, module by module:
  - the output opens as a LoRA of the same modules, in its own format's rules;
  - loaders that read tensors only (ComfyUI, A1111/Forge) and loaders that read metadata (diffusers,
    PEFT) get the same scale for every reduced module, and the same as before for every module
    passed through;
  - where a config or metadata states ranks (PEFT, diffusers), it states each module's real rank;
  - each reduced module has the reported rank, holds exactly the factors its metrics were computed
    on, and is read at exactly the scale they assumed; so its update is what the report describes;
  - its error against the ORIGINAL, both read by their own format's rules, is what the report claims:
    measured exactly (float64 Gram products, never the out x in matrix) for every module of a small
    file and for a spread sample of a large one (the cost is the size of the decomposition itself);
  - a lora_B.bias still adds scale * bias as before.

The writer has already read the whole file back from disk and found exactly the bytes it made
(lorad.engine.formats.writer); here the header, the alphas and the config are read from disk as a
loader reads them, and the header must locate each module's factors where the writer put them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lorad.engine.formats import scales
from lorad.engine.formats.encode import Encoding
from lorad.engine.formats.lora import LoraSource, Module, Reader, open_lora
from lorad.engine.formats.safetensors_file import Header
from lorad.engine.formats.writer import Layout
from lorad.engine.report import ModuleReport
from lorad.errors import ReduceError

# The claim is an upper bound (exact truncation + a bound on the cast's rounding); the measurement
# may sit above it only by float64 round-off. A scale mistake is off by orders more than this.
_ABS_TOL = 2e-5
_REL_TOL = 1e-3


MEASURE_ALL_UP_TO = 64  # modules; above it, a sample of this many is measured against the original


def check_written(source: LoraSource, written: Path, reports: dict[str, ModuleReport], layout: Layout,
                  enc: Encoding) -> None:
    """Raise ReduceError naming the first way `written` would be read differently from `reports`.

    layout: what the writer put where (lorad.engine.formats.writer.Layout)."""
    try:
        out = open_lora(written)
    except ReduceError:
        raise
    except Exception as e:  # the writer produced something its own reader refuses
        raise _mismatch(f"the written file does not open as a LoRA: {e}") from e
    before = {m.name: m for m in source.modules}
    after = {m.name: m for m in out.modules}
    problems = _structure(before, after, reports)
    problems += _configs(out)
    problems += _scales(before, after, reports)
    if not problems:
        problems = _contents(out.header, after, layout, enc)
    if not problems:
        problems = _errors(source, out, before, after, reports)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise _mismatch(shown)


def _mismatch(what: str) -> ReduceError:
    return ReduceError(f"refusing to write a file that loaders would read differently from its report: {what}")


def _structure(before: dict[str, Module], after: dict[str, Module], reports: dict[str, ModuleReport]) -> list[str]:
    problems = []
    for name, report in reports.items():
        m = after.get(name)
        if m is None:
            problems.append(f"module {name} is missing from the output")
        elif report.skipped is None and (m.rank != report.rank_out or not m.reducible):
            problems.append(f"{name}: written at rank {m.rank} ({m.kind}), reported {report.rank_out}")
    extra = set(after) - set(reports) - set(before)
    if extra:
        problems.append(f"modules that are not in the input: {sorted(extra)[:3]}")
    return problems


def _configs(out: LoraSource) -> list[str]:
    """A stated rank that differs from the tensor's is a load error in PEFT and diffusers."""
    rules = scales.ScaleRules(str(out.weights), out.header.metadata, out.peft_config)
    problems = []
    for m in out.modules:
        config = rules.config_for(m.name)
        if config is None or m.rank == 0:
            continue
        stated = scales.peft_rank(config, scales.config_path(m.name, out.peft_config is not None))
        if stated != m.rank:
            problems.append(f"{m.name}: its config says rank {stated}, its tensors have {m.rank}")
    return problems


def _scales(before: dict[str, Module], after: dict[str, Module], reports: dict[str, ModuleReport]) -> list[str]:
    problems = []
    for name, m in after.items():
        if m.readings is None:
            continue
        reduced = name in reports and reports[name].skipped is None
        if reduced and m.readings.disagree():
            problems.append(f"{name}: tensor-only loaders read scale {m.readings.tensors:.6g}, "
                            f"diffusers/PEFT {m.readings.metadata:.6g}")
        old = before.get(name)
        if not reduced and old is not None and old.readings is not None and old.readings != m.readings:
            problems.append(f"{name} (passed through): read at {m.readings}, was {old.readings}")
    return problems


def _contents(header: Header, after: dict[str, Module], layout: Layout, enc: Encoding) -> list[str]:
    """The file holds the very factors the metrics were computed on, read at the scale they assumed."""
    problems = []
    for name, written in layout.modules.items():
        m = after[name]
        assumed = enc.loader_scale(written.rank)
        if abs(m.scale - assumed) > 1e-6 * abs(assumed):
            problems.append(f"{name}: read at scale {m.scale:.6g}, its factors were folded for {assumed:.6g}")
        if not all(_located(header, layout, m.keys[role]) for role in ("up", "down")):
            problems.append(f"{name}: the file holds other factors than were computed")
    return problems


def _located(header: Header, layout: Layout, key: str) -> bool:
    """The header read from disk points `key` at the bytes the writer made for it."""
    entry, placed = header.tensors.get(key), layout.entries.get(key)
    return entry is not None and placed is not None \
        and (entry.dtype, entry.shape, entry.start, entry.end) == (placed.dtype, placed.shape, placed.start, placed.end)


def _sample(names: list[str], size: int) -> list[str]:
    if len(names) <= size:
        return names
    step = len(names) / size
    return [names[int(i * step)] for i in range(size)]


def _errors(source: LoraSource, out: LoraSource, before: dict[str, Module], after: dict[str, Module],
            reports: dict[str, ModuleReport]) -> list[str]:
    problems = []
    names = [n for n, r in reports.items() if r.skipped is None and n in before and "up" in before[n].keys]
    # (a module rebuilt from LoHa/LoKr has no up/down to compare: its dense dW is the engine's check)
    with Reader(source) as old_reader, Reader(out) as new_reader:
        for name in _sample(names, MEASURE_ALL_UP_TO):
            report = reports[name]
            old, new = before[name], after[name]
            up, down = new_reader.tensor(new.keys["up"]), new_reader.tensor(new.keys["down"])
            new_factors = up.reshape(new.out_features, new.rank), down.reshape(new.rank, new.in_features)
            measured = _rel_error(old_reader.factors(old), old.scale, new_factors, new.scale)
            if not measured <= report.rel_error * (1 + _REL_TOL) + _ABS_TOL:
                problems.append(f"{name}: measured error {measured:.6g} against the original, "
                                f"reported {report.rel_error:.6g}")
            problems += _bias(old_reader, old, new_reader, new)
    return problems


def _rel_error(old: tuple[torch.Tensor, torch.Tensor], s: float, new: tuple[torch.Tensor, torch.Tensor],
               s2: float) -> float:
    """||s B A - s2 B2 A2|| / ||s B A|| from Gram products: T - 2C + W, all in float64."""
    b, a = (t.to(torch.float64) for t in old)
    b2, a2 = (t.to(torch.float64) for t in new)
    total = s * s * float(((b.T @ b) * (a @ a.T)).sum())
    if total <= 0.0:
        return 0.0
    cross = s * s2 * float(((b.T @ b2) * (a @ a2.T)).sum())
    kept = s2 * s2 * float(((b2.T @ b2) * (a2 @ a2.T)).sum())
    return math.sqrt(max(total - 2.0 * cross + kept, 0.0) / total)


def _bias(old_reader: Reader, old: Module, new_reader: Reader, new: Module) -> list[str]:
    if "up_bias" not in old.keys:
        return []
    before = old_reader.tensor(old.keys["up_bias"]).to(torch.float64) * old.scale
    after = new_reader.tensor(new.keys["up_bias"]).to(torch.float64) * new.scale
    scale = float(before.abs().max()) or 1.0
    if float((before - after).abs().max()) > 1e-2 * scale:
        return [f"{old.name}: its lora_B.bias adds a different offset than before"]
    return []
