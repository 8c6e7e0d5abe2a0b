"""Reduce one LoRA: formats + reduce -> an output file and a Report. Used by the CLI and the worker.

The flow: open (validate header, group modules, read scales) -> decompose same-shape modules in
batches (exact factored SVD, on the GPU when there is one; lorad.engine._job) -> choose ranks ->
fold the scale and cast -> write each module as it is made (lorad.engine.formats.writer) -> the
header, and the whole file read back from disk -> read it as every loader family would and hold it
to the report (lorad.engine.readback) -> rename. Factors and outputs are streamed batch by batch:
neither the input nor the output is ever held in memory whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.engine import readback
from lorad.engine._job import DeviceOutOfMemory, Job, Progress, fake_oom_limit
from lorad.engine.formats import encode, output_metadata, writer
from lorad.engine.formats.lora import LoraSource, Module, most_common, open_lora
from lorad.engine.formats.safetensors_file import file_hashes
from lorad.engine.reduce import budget as budget_mod
from lorad.engine.reduce import rank_rules, select
from lorad.engine.report import FileInfo, ModuleReport, Report, Spectrum
from lorad.errors import ReduceError

HEADER_SLACK = 1024  # first guess at the room new metadata takes; a miss is corrected and retried
SPECTRA_IN_REPORT = 6


@dataclass(frozen=True)
class ReduceSettings:
    method: str
    param: float | None = None
    max_rank: int | None = None
    budget_mb: float | None = None
    device: str = "auto"
    dtype: str | None = None  # output dtype (fp16, bf16, fp32); None keeps each tensor's own
    kohya_compat: bool = False
    convert_lycoris: bool = False  # rebuild plain LoHa/LoKr modules as LoRA (a format change)
    seed: int = 0  # for `project` only
    rank_multiple: int | None = None  # rank rules for serving hosts (lorad.engine.reduce.rank_rules)
    uniform: bool = False
    serve: str | None = None

    @property
    def rule(self) -> rank_rules.RankRule:
        return rank_rules.rule_for(self.serve, self.rank_multiple, self.uniform, self.max_rank)

    def validate(self) -> None:
        select.validate(self.method, self.param, self.budget_mb)
        rule = self.rule
        if self.method == "project" and not rule.is_plain:
            raise ReduceError("method project is for comparison only; it takes no rank rules")
        if self.max_rank is not None and self.max_rank < 1:
            raise ReduceError(f"--max-rank must be >= 1, got {self.max_rank}")
        if self.dtype is not None and self.dtype not in encode.DTYPE_NAMES:
            raise ReduceError(f"unknown --dtype {self.dtype!r}; choose fp16, bf16 or fp32")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ReduceError(f"unknown --device {self.device!r}; choose auto, cpu or cuda")
        if self.kohya_compat and self.method in ("budget", "project"):
            raise ReduceError(f"--kohya-compat has no meaning for method {self.method}")
        if self.convert_lycoris and self.method in ("budget", "project"):
            raise ReduceError(f"--convert-lycoris works with per-module methods, not {self.method}")

    @property
    def tag(self) -> str:
        """The part of the default output name that says how it was made: fro0.9, rank16, budget64mb."""
        if self.method == "budget":
            tag = f"budget{_num(self.budget_mb if self.budget_mb is not None else self.param)}mb"
        else:
            tag = f"{self.method}{_num(self.param)}"
        return f"{tag}-{self.serve}" if self.serve else tag


def _num(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def default_output_path(src: Path, settings: ReduceSettings) -> Path:
    if src.is_dir():
        return src.with_name(f"{src.name}.{settings.tag}")
    stem = src.name[: -len(".safetensors")] if src.name.endswith(".safetensors") else src.stem
    return src.with_name(f"{stem}.{settings.tag}.safetensors")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ReduceError("--device cuda asked for, but torch sees no CUDA device (a CPU build of torch?)")
    return torch.device(requested)


def plan_file(src: str | Path, settings: ReduceSettings, progress: Progress | None = None) -> Report:
    """The choice `reduce_file` would make, from the spectra alone; nothing is written."""
    return _run(Path(src), None, settings, progress)


def reduce_file(
    src: str | Path, dst: str | Path | None, settings: ReduceSettings, progress: Progress | None = None
) -> Report:
    """Reduce `src` into `dst` (default: beside the input, see default_output_path), atomically."""
    src = Path(src)
    dst = Path(dst) if dst is not None else default_output_path(src, settings)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ReduceError(f"{dst}: the output would overwrite the input; choose another -o")
    return _run(src, dst, settings, progress)


def _run(src: Path, dst: Path | None, settings: ReduceSettings, progress: Progress | None) -> Report:
    started = time.perf_counter()
    settings.validate()
    device = pick_device(settings.device)
    source = open_lora(src)
    if not source.reducible:
        raise ReduceError(f"{src}: none of its {len(source.modules)} modules can be reduced "
                          f"({source.modules[0].skip})")
    notes: list[str] = list(source.notes)
    hashes = _hashes_in_background(source)
    try:
        return _run_on(source, dst, settings, progress, device, notes, started, fake_oom_limit(), hashes)
    except DeviceOutOfMemory as e:
        if device.type == "cpu" and fake_oom_limit() is None:
            raise ReduceError(f"{src}: out of memory: {e}") from None
        notes.append(f"out of memory: {e}; the file was reduced on the CPU instead")
        return _run_on(source, dst, settings, progress, torch.device("cpu"), notes, started, None, hashes)


def _hashes_in_background(source: LoraSource) -> Future[tuple[str, str]]:
    """The input's sha256 and data sha256, read in a thread while the modules are decomposed:
    file reads and hashlib release the GIL, so the hashing costs no wall time of its own."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="lorad-hash")
    try:
        return pool.submit(file_hashes, source.weights, source.header.data_offset)
    finally:
        pool.shutdown(wait=False)


def _run_on(source: LoraSource, dst: Path | None, settings: ReduceSettings, progress: Progress | None,
            device: torch.device, notes: list[str], started: float, fake_oom: int | None,
            hashes: Future[tuple[str, str]]) -> Report:
    notes = list(notes)
    rule = settings.rule

    jobs: list[Job] = []

    def job(fixed_ranks: dict[str, int] | None, enc: encode.Encoding) -> Job:
        jobs.append(Job(source, settings, device, enc, fixed_ranks, progress, notes, fake_oom, rule))
        return jobs[-1]

    enc = encode.choose_encoding(source, _reference_rank(source, settings), settings.dtype)
    spectra: dict[str, budget_mod.BudgetItem] | None = None
    fixed_ranks: dict[str, int] | None = None
    if settings.method == "budget":
        spectra = _spectra_for_budget(source, settings, rule, job(None, enc))
        fixed_ranks = _allocate(source, settings, rule, spectra, 0, notes)
    elif rule.uniform:
        spectra, fixed_ranks = _one_rank(source, settings, rule, job(None, enc), notes)
    if rule.uniform and fixed_ranks:  # one rank: the alpha kohya would write for it, nothing folded
        enc = encode.choose_encoding(source, next(iter(fixed_ranks.values())), settings.dtype)
    if dst is None:
        known = {name: item.spectrum for name, item in spectra.items()} if spectra else None
        module_reports = job(fixed_ranks, enc).plan(known)
        output = None
    else:
        for attempt in range(3):
            module_reports, written = _reduce_into(source, job(fixed_ranks, enc), enc, dst,
                                                   lambda: _provenance(settings, rule, *hashes.result()))
            overshoot = written.bytes - _target_bytes(settings) if settings.method == "budget" else 0
            if overshoot <= 0 or attempt == 2:
                break
            # The header came out larger than guessed: give those bytes back and allocate again.
            fixed_ranks = _allocate(source, settings, rule, spectra, overshoot, notes)
        output = FileInfo(str(written.path), written.sha256, written.bytes)
        if settings.method == "budget":
            notes.append(_budget_note(written.bytes, settings))
    reports = _in_file_order(source, module_reports)
    input_info = FileInfo(str(source.path), hashes.result()[0], source.header.file_bytes, source.format,
                          len(source.modules))  # fmt: skip
    return Report(input_info, output, settings.method, _param(settings), time.perf_counter() - started,
                  str(device), reports, tuple(notes), _largest_spectra(jobs[-1].spectra_seen, module_reports),
                  None if rule.is_plain else rule.describe(settings.max_rank), rule.serve)


def _provenance(settings: ReduceSettings, rule: rank_rules.RankRule, sha256: str, data_sha256: str) -> dict[str, str]:
    extra = {"lorad.source_autov3": data_sha256[:12]}
    if not rule.is_plain:
        extra.update({"lorad.rank_rule": rule.describe(settings.max_rank),
                      **({"lorad.serve": rule.serve} if rule.serve else {})})
    return output_metadata.provenance_keys(sha256, settings.method, _param(settings), extra)


def _largest_spectra(spectra: dict[str, torch.Tensor], reports: dict[str, ModuleReport],
                     count: int = SPECTRA_IN_REPORT) -> tuple[Spectrum, ...]:
    """The spectra of the modules with the largest updates, with where each was cut."""
    largest = sorted(spectra, key=lambda name: -(reports[name].norm or 0.0))[:count]
    return tuple(Spectrum(name, tuple(round(float(v), 7) for v in spectra[name]), reports[name].rank_out)
                 for name in largest)


def _reduce_into(source: LoraSource, job: Job, enc: encode.Encoding, dst: Path,
                 provenance: Callable[[], dict[str, str]]) -> tuple[dict[str, ModuleReport], writer.Written]:
    """Reduce, each module written as it is made; then the header, and the read-back that holds the
    written file to the reports (lorad.engine.readback) before it is renamed into place."""
    with writer.LoraWriter(source, enc, dst) as out:
        reports = job.reduce(out.put)

        def check(written: Path, layout: writer.Layout) -> None:
            readback.check_written(source, written, reports, layout, enc)

        return reports, out.finish(provenance(), check)


def _param(settings: ReduceSettings) -> float | None:
    if settings.method == "budget" and settings.budget_mb is not None:
        return settings.budget_mb
    return settings.param


def _reference_rank(source: LoraSource, settings: ReduceSettings) -> int:
    usual = most_common([m.rank for m in source.reducible], 1)
    if settings.method in ("rank", "project"):
        return max(1, min(int(settings.param or 1), usual, settings.max_rank or usual))
    return usual


def _in_file_order(source: LoraSource, reports: dict[str, ModuleReport]) -> tuple[ModuleReport, ...]:
    return tuple(reports.get(m.name) or _skipped_report(source, m) for m in source.modules)


def _skipped_report(source: LoraSource, m: Module) -> ModuleReport:
    nbytes = sum(source.header.tensors[k].nbytes for k in m.keys.values())
    params = sum(_numel(source.header.tensors[k].shape) for k in m.keys.values())
    return ModuleReport(m.name, m.kind, m.rank, m.rank, 1.0, 1.0, 0.0, params, params, nbytes, nbytes, m.skip)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _target_bytes(settings: ReduceSettings) -> int:
    target_mib = settings.budget_mb if settings.budget_mb is not None else float(settings.param or 0)
    return int(target_mib * budget_mod.MIB)


def _spectra_for_budget(source: LoraSource, settings: ReduceSettings, rule: rank_rules.RankRule,
                        job: Job) -> dict[str, budget_mod.BudgetItem]:
    """Pass 1 of `budget`: every module's spectrum, its cap, its cost per kept direction, and the
    ranks a rank rule allows it."""
    items = {}
    for m, s in job.spectra():
        itemsize = encode.output_dtype(m.dtype, settings.dtype).itemsize
        available = min(m.rank, s.numel())
        cap = min(available, settings.max_rank or m.rank)
        levels = None if rule.is_plain or rule.uniform else tuple(rank_rules.levels(rule, available, settings.max_rank))
        items[m.name] = budget_mod.BudgetItem(s, cap, (m.out_features + m.in_features) * itemsize, levels)
    return items


def _allocate(source: LoraSource, settings: ReduceSettings, rule: rank_rules.RankRule,
              items: dict[str, budget_mod.BudgetItem], extra_fixed: int, notes: list[str]) -> dict[str, int]:
    fixed = _fixed_bytes(source) + extra_fixed
    if rule.uniform:
        top = max(it.cap for it in items.values())
        candidates = list(rule.allowed) if rule.allowed else sorted(
            {rule.per_module(k, k, settings.max_rank) for k in range(1, top + 1)})
        candidates = [c for c in candidates if settings.max_rank is None or c <= settings.max_rank] or candidates[:1]
        one = budget_mod.allocate_uniform(list(items.values()), fixed, _target_bytes(settings), candidates)
        notes.append(f"budget: {len(items)} modules, one rank {one} for every module")
        return dict.fromkeys(items, one)
    ranks = budget_mod.allocate(list(items.values()), fixed, _target_bytes(settings))
    notes.append(f"budget: {len(items)} modules, {sum(ranks)} singular directions kept")
    return dict(zip(items, ranks))


def _one_rank(source: LoraSource, settings: ReduceSettings, rule: rank_rules.RankRule, job: Job,
              notes: list[str]) -> tuple[dict[str, budget_mod.BudgetItem], dict[str, int]]:
    """A uniform rule's pass 1: the method's rank for every module, then the one rank for all."""
    items, wanted = {}, {}
    for m, s in job.spectra():
        items[m.name] = budget_mod.BudgetItem(s, min(m.rank, s.numel()), 0)
        wanted[m.name] = job.method_rank(m, s)
    one = rule.one_rank(wanted.values(), settings.max_rank)
    short = sum(1 for k in wanted.values() if k > one)
    padded = sum(1 for it in items.values() if it.cap < one)
    notes.append(f"one rank {one} for all {len(wanted)} modules ({rule.describe()})"
                 + (f"; {short} modules wanted more and are capped" if short else "")
                 + (f"; {padded} modules have fewer directions and are padded with zeros" if padded else ""))
    return items, dict.fromkeys(wanted, one)


def _fixed_bytes(source: LoraSource) -> int:
    """Bytes a budget cannot shrink: header, pass-through tensors and one alpha per module."""
    passthrough = sum(source.header.tensors[k].nbytes for k in source.passthrough)
    return 8 + source.header.header_bytes + HEADER_SLACK + passthrough + 4 * len(source.reducible)


def _budget_note(size: int, settings: ReduceSettings) -> str:
    target = settings.budget_mb if settings.budget_mb is not None else settings.param
    verdict = "met" if size <= target * budget_mod.MIB else "MISSED"
    return f"budget {verdict}: {size / budget_mod.MIB:.3f} MiB written, target {target} MiB"


__all__ = ["ReduceSettings", "default_output_path", "plan_file", "reduce_file"]
