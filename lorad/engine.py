"""Reduce one LoRA: formats + reduce -> an output file and a Report. Used by the CLI and the worker.

The flow: open (validate header, group modules, read scales) -> decompose same-shape modules in
batches (exact factored SVD, on the GPU when there is one) -> choose ranks -> fold the scale and
cast -> write beside the target and rename. Factors are streamed batch by batch; only the reduced
output is held in memory.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorad.errors import FormatError, OutputWriteError, ReduceError
from lorad.formats import encode, writer
from lorad.formats.lora import LoraSource, Module, Reader, most_common, open_lora, read_scalar
from lorad.formats.safetensors_file import file_hashes
from lorad.reduce import budget as budget_mod
from lorad.reduce import metrics, select
from lorad.reduce.lycoris import loha_delta, lokr_delta
from lorad.reduce.project import random_projection
from lorad.reduce.svd import NonFiniteError, factored_svd, singular_values
from lorad.report import FileInfo, ModuleReport, Report

Progress = Callable[[int, int], None]
BATCH_BYTES = 96 << 20  # float32 factor bytes decomposed at once; bounds peak memory per batch
HEADER_SLACK = 1024  # first guess at the room new metadata takes; a miss is corrected and retried


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

    def validate(self) -> None:
        select.validate(self.method, self.param, self.budget_mb)
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
            return f"budget{_num(self.budget_mb if self.budget_mb is not None else self.param)}mb"
        return f"{self.method}{_num(self.param)}"


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
    source_sha256, source_data_sha256 = file_hashes(source.weights, source.header)
    input_info = FileInfo(str(src), source_sha256, source.header.file_bytes, source.format, len(source.modules))
    notes: list[str] = []
    enc = encode.choose_encoding(source, _reference_rank(source, settings), settings.dtype)
    if settings.method == "budget":
        spectra = _spectra_for_budget(source, settings, device)
        fixed_ranks = _allocate(source, settings, spectra, 0, notes)
    else:
        spectra, fixed_ranks = None, None
    if dst is None:
        known = {name: item.spectrum for name, item in spectra.items()} if spectra else None
        module_reports = _Job(source, settings, device, enc, fixed_ranks, progress).plan(known)
        output = None
    else:
        extra = {"lorad.source_autov3": source_data_sha256[:12]}
        provenance = writer.provenance_keys(input_info.sha256, settings.method, _param(settings), extra)
        for attempt in range(3):
            module_reports, outputs = _Job(source, settings, device, enc, fixed_ranks, progress).reduce()
            written = _write(source, outputs, enc, dst, provenance)
            overshoot = written.bytes - _target_bytes(settings) if spectra else 0
            if overshoot <= 0 or attempt == 2:
                break
            # The header came out larger than guessed: give those bytes back and allocate again.
            fixed_ranks = _allocate(source, settings, spectra, overshoot, notes)
        output = FileInfo(str(written.path), written.sha256, written.bytes)
        if spectra:
            notes.append(_budget_note(written.bytes, settings))
    reports = _in_file_order(source, module_reports)
    return Report(input_info, output, settings.method, _param(settings), time.perf_counter() - started,
                  str(device), reports, tuple(notes))


def _write(source: LoraSource, outputs: dict, enc: encode.Encoding, dst: Path,
           provenance: dict[str, str]) -> writer.Written:
    try:
        return writer.write_lora(source, outputs, enc, dst, provenance)
    except OSError as e:  # full disk, file too large, read-only folder: nothing was left behind
        raise OutputWriteError(f"{dst}: cannot write the output: {e.strerror or e}") from e


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


# ---------------------------------------------------------------------------------------------
# Batches of same-shape modules


def _batches(source: LoraSource) -> Iterator[list[Module]]:
    """Same (out, in, rank) modules together, each batch under BATCH_BYTES of float32 factors."""
    groups: dict[tuple[int, int, int], list[Module]] = {}
    for m in source.reducible:
        groups.setdefault((m.out_features, m.in_features, m.rank), []).append(m)
    for (out, inp, r), members in groups.items():
        per = max(1, BATCH_BYTES // (4 * r * (out + inp)))
        for i in range(0, len(members), per):
            yield members[i : i + per]


def _load(reader: Reader, batch: list[Module], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's factors stacked in the compute dtype (float32; float64 if stored so)."""
    first = batch[0]
    dtype = torch.float64 if any(m.dtype == "F64" for m in batch) else torch.float32
    up = torch.empty(len(batch), first.out_features, first.rank, dtype=dtype)
    down = torch.empty(len(batch), first.rank, first.in_features, dtype=dtype)
    for i, m in enumerate(batch):
        u, d = reader.factors(m)
        up[i].copy_(u)  # converts on the way in: one pass, no intermediate copy
        down[i].copy_(d)
    scale = torch.tensor([m.scale for m in batch], dtype=dtype)
    return up.to(device), down.to(device), scale.to(device)


_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _lycoris_as_lora(reader: Reader, m: Module) -> tuple[Module, torch.Tensor] | None:
    """(the module as a 2-D LoRA module, its dense dW), or None where it stays as it is:
    not LoHa/LoKr, or CP/Tucker-decomposed (hada_t*, lokr_t2) or 4-D factors."""
    if m.kind not in ("loha", "lokr") or any(r in m.keys for r in ("hada_t1", "hada_t2", "lokr_t2")):
        return None
    factors = {role: reader.tensor(key).to(torch.float32) for role, key in m.keys.items()
               if role.startswith(("hada_", "lokr_"))}
    if any(t.ndim != 2 for t in factors.values()):
        return None
    for role, t in factors.items():
        if not torch.isfinite(t).all():
            raise FormatError(f"{reader.header.path}: tensor {m.keys[role]!r} contains NaN or Inf values")
    alpha = read_scalar(reader.header, m.keys["alpha"]) if "alpha" in m.keys else None
    if m.kind == "loha":
        if not set(_LOHA) <= set(factors):
            return None
        dW = loha_delta(*(factors[r] for r in _LOHA), alpha)
        rank = factors["hada_w1_b"].shape[0]
    else:
        dW = lokr_delta(factors, alpha)
        rank = min(dW.shape)
    out, inp = dW.shape
    dtype = reader.header.tensors[next(iter(m.keys.values()))].dtype
    return Module(m.name, m.kind, m.keys, out, inp, rank, (), dtype, 1.0), dW


def _decompose(reader: Reader, batch: list[Module], fn: Callable, *args: torch.Tensor):
    """Run a decomposition; NaN or Inf in the factors surfaces there, cheaply, and is named then."""
    try:
        return fn(*args)
    except NonFiniteError:
        reader.check_finite(batch)
        raise


def _target_bytes(settings: ReduceSettings) -> int:
    target_mib = settings.budget_mb if settings.budget_mb is not None else float(settings.param or 0)
    return int(target_mib * budget_mod.MIB)


def _spectra_for_budget(source: LoraSource, settings: ReduceSettings,
                        device: torch.device) -> dict[str, budget_mod.BudgetItem]:
    """Pass 1 of `budget`: every module's spectrum, its cap and its cost per kept direction."""
    items = {}
    with Reader(source) as reader:
        for batch in _batches(source):
            up, down, scale = _load(reader, batch, device)
            for m, s in zip(batch, _decompose(reader, batch, singular_values, up, down, scale).cpu()):
                itemsize = encode.output_dtype(m.dtype, settings.dtype).itemsize
                cap = min(m.rank, s.numel(), settings.max_rank or m.rank)
                items[m.name] = budget_mod.BudgetItem(s, cap, (m.out_features + m.in_features) * itemsize)
    return items


def _allocate(source: LoraSource, settings: ReduceSettings, items: dict[str, budget_mod.BudgetItem],
              extra_fixed: int, notes: list[str]) -> dict[str, int]:
    fixed = _fixed_bytes(source) + extra_fixed
    ranks = budget_mod.allocate(list(items.values()), fixed, _target_bytes(settings))
    notes.append(f"budget: {len(items)} modules, {sum(ranks)} singular directions kept")
    return dict(zip(items, ranks))


def _fixed_bytes(source: LoraSource) -> int:
    """Bytes a budget cannot shrink: header, pass-through tensors and one alpha per module."""
    passthrough = sum(source.header.tensors[k].nbytes for k in source.passthrough)
    return 8 + source.header.header_bytes + HEADER_SLACK + passthrough + 4 * len(source.reducible)


def _budget_note(size: int, settings: ReduceSettings) -> str:
    target = settings.budget_mb if settings.budget_mb is not None else settings.param
    verdict = "met" if size <= target * budget_mod.MIB else "MISSED"
    return f"budget {verdict}: {size / budget_mod.MIB:.3f} MiB written, target {target} MiB"


class _Job:
    """One file's reduction: per batch, decompose, choose ranks, fold, cast, measure."""

    def __init__(self, source: LoraSource, settings: ReduceSettings, device: torch.device,
                 enc: encode.Encoding, fixed_ranks: dict[str, int] | None, progress: Progress | None):
        self.source, self.settings, self.device, self.enc = source, settings, device, enc
        self.fixed_ranks, self.progress = fixed_ranks, progress
        self.total, self.done = len(source.reducible), 0

    def _tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)

    def _rank(self, m: Module, S: torch.Tensor) -> int:
        if self.fixed_ranks is not None:
            return self.fixed_ranks[m.name]
        s = self.settings
        dense_len = min(m.out_features, m.in_features)
        return select.select_rank(S, s.method, float(s.param or 0), m.rank, s.max_rank, s.kohya_compat, dense_len)

    def plan(self, spectra: dict[str, torch.Tensor] | None = None) -> dict[str, ModuleReport]:
        """Reports from the spectra alone; `spectra` when already computed (a budget's pass 1)."""
        reports = {}
        for m, S in self._spectra() if spectra is None else ((m, spectra[m.name]) for m in self.source.reducible):
            k = self._rank(m, S)
            fro, tail, total = metrics.truncation(S, k)
            reports[m.name] = self._report(m, k, metrics.Quality(fro, tail / total if total else 0.0, total))
            self._tick()
        return reports

    def _spectra(self) -> Iterator[tuple[Module, torch.Tensor]]:
        with Reader(self.source) as reader:
            for batch in _batches(self.source):
                up, down, scale = _load(reader, batch, self.device)
                yield from zip(batch, _decompose(reader, batch, singular_values, up, down, scale).cpu())

    def reduce(self) -> tuple[dict[str, ModuleReport], dict[str, writer.ModuleOutput]]:
        reports, outputs = {}, {}
        with Reader(self.source) as reader:
            for batch in _batches(self.source):
                up, down, scale = _load(reader, batch, self.device)
                if self.settings.method == "project":
                    reader.check_finite(batch)  # no decomposition to notice NaN or Inf for us
                    results = self._project(batch, up, down)
                else:
                    results = self._truncate(batch, _decompose(reader, batch, factored_svd, up, down, scale))
                for m, k, out_up, out_down, quality in results:
                    outputs[m.name] = writer.ModuleOutput(m, k, out_up, out_down)
                    reports[m.name] = self._report(m, k, quality)
                    self._tick()
            if self.settings.convert_lycoris:
                for m in self.source.modules:
                    converted = _lycoris_as_lora(reader, m)
                    if converted is not None:
                        lora_module, dW = converted
                        out = self._convert(lora_module, dW)
                        outputs[m.name] = out[0]
                        reports[m.name] = out[1]
        return reports, outputs

    def _convert(self, m: Module, dW: torch.Tensor) -> tuple[writer.ModuleOutput, ModuleReport]:
        """A LoHa/LoKr module as plain LoRA: dense SVD of its update, the same rank rule."""
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        s = self.settings
        k = select.select_rank(S, s.method, float(s.param or 0), S.numel(), s.max_rank, s.kohya_compat, S.numel())
        Uk, Sk, Vk = U[:, :k], S[:k], Vh[:k].T
        out_up, out_down, up_back, down_back = self._encode(m, k, Uk * Sk, Vk.T)
        quality = metrics.svd_quality(S, k, Uk, Vk, up_back, down_back)
        report = replace(self._report(m, k, quality), kind=f"{m.kind}->lora", rank_in=m.rank)
        return writer.ModuleOutput(m, k, out_up, out_down), report

    def _truncate(self, batch: list[Module], svd) -> Iterator[tuple]:
        S_all = svd.S.cpu()
        for g, m in enumerate(batch):
            k = self._rank(m, S_all[g])
            Uk, Sk, Vk = (t.cpu() for t in svd.truncate(g, k))
            up_eff = Uk * Sk
            out_up, out_down, up_back, down_back = self._encode(m, k, up_eff, Vk.T)
            quality = metrics.svd_quality(S_all[g], k, Uk, Vk, up_back, down_back)
            yield m, k, out_up, out_down, quality

    def _project(self, batch: list[Module], up: torch.Tensor, down: torch.Tensor) -> Iterator[tuple]:
        for g, m in enumerate(batch):
            k = max(1, min(int(self.settings.param or 1), m.rank, self.settings.max_rank or m.rank))
            gen = torch.Generator().manual_seed(self.settings.seed ^ zlib.crc32(m.name.encode()))
            u, d = up[g].cpu(), down[g].cpu()
            new_up, new_down = random_projection(u, d, m.scale, k, gen)
            out_up, out_down, up_back, down_back = self._encode(m, k, new_up, new_down)
            rel = metrics.exact_rel_error(m.scale * u, d, up_back, down_back)
            # No spectrum ranks a projection; the norm it "retains" is the one its error leaves.
            norm = metrics.product_norm(m.scale * u, d)
            yield m, k, out_up, out_down, metrics.Quality(max(0.0, 1.0 - rel * rel) ** 0.5, rel, norm)

    def _encode(self, m: Module, k: int, up_eff: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Fold the loader's scale out of up, cast, and read back what the file will really hold."""
        loader_scale = self.enc.loader_scale(k)
        dtype = encode.output_dtype(m.dtype, self.settings.dtype)
        out_up = (up_eff / loader_scale).to(dtype).contiguous()
        out_down = down.to(dtype).contiguous()
        up_back = out_up.to(up_eff.dtype) * loader_scale
        down_back = out_down.to(down.dtype)
        return out_up.reshape(m.up_shape(k)), out_down.reshape(m.down_shape(k)), up_back, down_back

    def _report(self, m: Module, k: int, q: metrics.Quality) -> ModuleReport:
        itemsize_in = encode.output_dtype(m.dtype, None).itemsize
        itemsize_out = encode.output_dtype(m.dtype, self.settings.dtype).itemsize
        return ModuleReport(
            name=m.name, kind=m.kind, rank_in=m.rank, rank_out=k,
            fro_retained=q.fro_retained, energy_retained=q.fro_retained**2, rel_error=q.rel_error,
            params_in=m.params(), params_out=m.params(k),
            bytes_in=m.params() * itemsize_in, bytes_out=m.params(k) * itemsize_out, norm=q.norm,
        )  # fmt: skip


__all__ = ["ReduceSettings", "default_output_path", "plan_file", "reduce_file"]
