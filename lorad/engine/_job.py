"""One file's reduction, batch by batch: load same-shape modules, decompose, choose ranks, fold the
scale, cast, measure. Used by lorad.engine.engine, which owns the settings, the output and the report.

A CUDA out-of-memory never fails a file for lack of VRAM alone: the batch is halved and retried,
and a single module that still does not fit raises DeviceOutOfMemory, on which the engine redoes
the file on the CPU. Both are noted in the report.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from lorad.engine.formats import encode, writer
from lorad.engine.formats.lora import LoraSource, Module, Reader, read_scalar
from lorad.engine.reduce import metrics, select
from lorad.engine.reduce.lycoris import loha_delta, lokr_delta
from lorad.engine.reduce.project import random_projection
from lorad.engine.reduce.rank_rules import RankRule
from lorad.engine.reduce.svd import NonFiniteError, factored_svd, singular_values
from lorad.engine.report import ModuleReport
from lorad.errors import FormatError

Progress = Callable[[int, int], None]
# float32 factor bytes decomposed at once. On the CPU a batch's factors, their QR's copies and the
# heap they leave behind are what a file's reduction adds to torch (the output goes to disk as it
# is made): the SDXL r128 file peaks near 0.32 GB at 8 MiB, 0.34 GB at 16 and 0.38 GB at 32, and
# 16 takes about 5 % less time than 8 (fewer, larger calls). A GPU keeps its bigger batches.
BATCH_BYTES = 16 << 20
GPU_BATCH_BYTES = 96 << 20
# Test hook: decomposing a batch of more than N modules raises a (fake) out-of-memory on the first
# device tried, as a full GPU would. Unset in any real deployment.
FAKE_OOM_ENV = "LORAD_TEST_FAKE_OOM"


class DeviceOutOfMemory(Exception):
    """A single module does not fit on the device: the file must be redone on the CPU."""


def batches(source: LoraSource, batch_bytes: int = BATCH_BYTES, minimum: int = 1) -> Iterator[list[Module]]:
    """Same (out, in, rank) modules together, each batch under batch_bytes of float32 factors
    unless it takes more to hold `minimum` modules."""
    groups: dict[tuple[int, int, int], list[Module]] = {}
    for m in source.reducible:
        groups.setdefault((m.out_features, m.in_features, m.rank), []).append(m)
    for (out, inp, r), members in groups.items():
        per = max(minimum, batch_bytes // (4 * r * (out + inp)))
        for i in range(0, len(members), per):
            yield members[i : i + per]


def _load(reader: Reader, batch: list[Module], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's factors stacked in the compute dtype (float32; float64 if stored so)."""
    first = batch[0]
    dtype = torch.float64 if any(m.dtype == "F64" for m in batch) else torch.float32
    # For a GPU the batch is gathered in page-locked memory: its copy to the device is then a direct
    # DMA (pageable memory goes through a staging buffer) and does not block the CPU from queueing
    # the decomposition behind it. torch's host allocator keeps the buffer until the copy is done,
    # and reuses it for a later batch. (Not yet measured on a GPU: no device was lent for it.)
    pinned = device.type == "cuda"
    up = torch.empty(len(batch), first.out_features, first.rank, dtype=dtype, pin_memory=pinned)
    down = torch.empty(len(batch), first.rank, first.in_features, dtype=dtype, pin_memory=pinned)
    for i, m in enumerate(batch):
        u, d = reader.factors(m)
        up[i].copy_(u)  # converts on the way in: one pass, no intermediate copy
        down[i].copy_(d)
    scale = torch.tensor([m.scale for m in batch], dtype=dtype)
    return up.to(device, non_blocking=pinned), down.to(device, non_blocking=pinned), scale.to(device)


def fake_oom_limit() -> int | None:
    value = os.environ.get(FAKE_OOM_ENV)
    return int(value) if value not in (None, "") else None


def _parts(batch: list[Module], count: int) -> list[list[Module]]:
    """The batch cut into `count` near-equal runs (fewer where it has fewer modules)."""
    count = max(1, min(count, len(batch)))
    bounds = [len(batch) * i // count for i in range(count + 1)]
    return [batch[a:b] for a, b in zip(bounds, bounds[1:])]


class Decomposer:
    """Yields (modules, fn(modules, up, down, scale)) for every part of every batch of a file,
    halving batches on OOM.

    On the CPU each batch is cut into one part per torch thread, and each part is loaded and
    decomposed in a thread of its own running torch on one thread. torch's batched linear algebra
    on the CPU loops over the batch, and MKL's threads inside one 128-wide QR or eigh cost more than
    they give (a batch of geqrf takes longer on two threads than on one): threads over the batch
    are what use the cores. Whatever fn keeps is all that outlives a part: factors, reflectors and
    cores are freed in the thread that made them.
    """

    def __init__(self, source: LoraSource, device: torch.device, notes: list[str], fake_oom: int | None = None):
        self.source, self.device, self.notes, self.fake_oom = source, device, notes, fake_oom
        self.threads = torch.get_num_threads() if device.type == "cpu" else 1

    def run(self, reader: Reader, fn: Callable) -> Iterator[tuple[list[Module], object]]:
        cpu = self.device.type == "cpu"
        # one module per thread at least: the largest modules would run alone on one core otherwise
        pending = list(batches(self.source, BATCH_BYTES if cpu else GPU_BATCH_BYTES, self.threads))
        with ThreadPoolExecutor(self.threads, thread_name_prefix="lorad-decompose") as pool:
            while pending:
                batch = pending.pop(0)
                try:
                    if self.fake_oom is not None and len(batch) > self.fake_oom:
                        raise torch.OutOfMemoryError(f"{FAKE_OOM_ENV}: a batch of {len(batch)} modules")
                    parts = _parts(batch, self.threads)
                    results = self._map(pool, reader, fn, parts)
                except torch.OutOfMemoryError as e:
                    self._release()
                    if len(batch) == 1:
                        raise DeviceOutOfMemory(f"{batch[0].name} alone does not fit on {self.device}: {e}") from None
                    half = len(batch) // 2
                    self.notes.append(f"out of memory: a batch of {len(batch)} modules did not fit on {self.device}; "
                                      f"retried in batches of {half} and {len(batch) - half}")
                    pending[0:0] = [batch[:half], batch[half:]]
                    continue
                yield from zip(parts, results)
                del results  # what the caller made of this batch is not kept while the next is made

    def _map(self, pool: ThreadPoolExecutor, reader: Reader, fn: Callable, parts: list[list[Module]]) -> list:
        if len(parts) == 1:
            return [self._part(reader, fn, parts[0])]
        try:
            return list(pool.map(lambda part: self._part(reader, fn, part, one_thread=True), parts))
        finally:
            # torch.set_num_threads is per thread, but also sets the count that threads torch has not
            # seen yet start with: give that back
            torch.set_num_threads(self.threads)

    def _part(self, reader: Reader, fn: Callable, part: list[Module], one_thread: bool = False) -> object:
        if one_thread:
            torch.set_num_threads(1)
        up, down, scale = _load(reader, part, self.device)
        try:
            return fn(part, up, down, scale)
        except NonFiniteError:  # NaN or Inf surfaces in the decomposition, cheaply, and is named here
            reader.check_finite(part)
            raise

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


def _reduce_spectrum(up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The spectrum exactly as `reduce` computes it. eigvalsh and eigh differ in the last digits, and
    where a module's retained ratio sits on the method's threshold that decides its rank: a plan
    must choose what the reduction will."""
    return factored_svd(up, down, scale).S


class Job:
    """One file's reduction: per batch, decompose, choose ranks, fold, cast, measure."""

    def __init__(self, source: LoraSource, settings, device: torch.device,  # type: ignore[no-untyped-def]
                 enc: encode.Encoding, fixed_ranks: dict[str, int] | None, progress: Progress | None,
                 notes: list[str], fake_oom: int | None = None, rule: RankRule | None = None):  # fmt: skip
        self.source, self.settings, self.device, self.enc = source, settings, device, enc
        self.rule = rule or RankRule()
        self.fixed_ranks, self.progress = fixed_ranks, progress
        self.total, self.done = len(source.reducible), 0
        self.decomposer = Decomposer(source, device, notes, fake_oom)
        self.spectra_seen: dict[str, torch.Tensor] = {}  # every module's spectrum, for the report

    def _tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)

    def method_rank(self, m: Module, S: torch.Tensor) -> int:
        """The method's own choice for one module (1..available, capped by max_rank)."""
        s = self.settings
        dense_len = min(m.out_features, m.in_features)
        return select.select_rank(S, s.method, float(s.param or 0), m.rank, s.max_rank, s.kohya_compat, dense_len)

    def _rank(self, m: Module, S: torch.Tensor) -> int:
        """The rank written: fixed by a whole-file pass, or the method's choice under the rank rule
        (which may exceed the module's directions where the rule pads with zeros)."""
        if self.fixed_ranks is not None:
            return self.fixed_ranks[m.name]
        return self.rule.per_module(self.method_rank(m, S), min(m.rank, S.numel()), self.settings.max_rank)

    def spectra(self, fn: Callable = singular_values) -> Iterator[tuple[Module, torch.Tensor]]:
        """Every reducible module's singular values (the R factors suffice)."""
        with Reader(self.source) as reader:
            for part, S in self.decomposer.run(reader, lambda _part, *factors: fn(*factors)):
                yield from zip(part, S.cpu())  # type: ignore[attr-defined]

    def plan(self, spectra: dict[str, torch.Tensor] | None = None) -> dict[str, ModuleReport]:
        """Reports from the spectra alone; `spectra` when already computed (a budget's pass 1)."""
        reports = {}
        for m, S in self.spectra(_reduce_spectrum) if spectra is None else ((m, spectra[m.name]) for m in self.source.reducible):
            self.spectra_seen[m.name] = S
            k = self._rank(m, S)
            fro, tail, total = metrics.truncation(S, k)
            reports[m.name] = self._report(m, k, metrics.Quality(fro, tail / total if total else 0.0, total))
            self._tick()
        return reports

    def reduce(self, put: Callable[[writer.ModuleOutput], None]) -> dict[str, ModuleReport]:
        """Reduce every module, handing each output to `put` as soon as it is made (nothing of the
        output is held here); the reports."""
        reports = {}
        project = self.settings.method == "project"
        with Reader(self.source) as reader:

            def reduced(part: list[Module], up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor) -> list[tuple]:
                if project:
                    reader.check_finite(part)  # no decomposition to notice NaN or Inf for us
                    return list(self._project(part, up, down))
                return list(self._truncate(part, factored_svd(up, down, scale)))

            for _part, results in self.decomposer.run(reader, reduced):
                for m, k, out_up, out_down, quality in results:  # type: ignore[attr-defined]
                    put(writer.ModuleOutput(m, k, out_up, out_down, self._bias(reader, m, k)))
                    reports[m.name] = self._report(m, k, quality)
                    self._tick()
                del results  # on disk now: not held while the next batch is made
            if self.settings.convert_lycoris:
                for m in self.source.modules:
                    converted = _lycoris_as_lora(reader, m)
                    if converted is not None:
                        lora_module, dW = converted
                        output, reports[m.name] = self._convert(lora_module, dW)
                        put(output)
        return reports

    def _bias(self, reader: Reader, m: Module, k: int) -> torch.Tensor | None:
        """lora_B.bias is added at the module's scale: fold the same factor into it as into up."""
        key = m.keys.get("up_bias")
        if key is None:
            return None
        bias = reader.tensor(key)
        factor = m.scale / self.enc.loader_scale(k)
        if factor == 1.0:
            return bias
        return (bias.to(torch.float64) * factor).to(bias.dtype)

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

    def _truncate(self, batch: list[Module], svd) -> Iterator[tuple]:  # type: ignore[no-untyped-def]
        S_all = svd.S.cpu()
        for g, m in enumerate(batch):
            self.spectra_seen[m.name] = S_all[g]
            k = self._rank(m, S_all[g])
            real = min(k, S_all.shape[1])  # directions beyond these are a rule's zero padding
            Uk, Sk, Vk = (t.cpu() for t in svd.truncate(g, real))
            up_eff, down = Uk * Sk, Vk.T
            if k > real:
                up_eff = torch.cat([up_eff, up_eff.new_zeros(up_eff.shape[0], k - real)], dim=1)
                down = torch.cat([down, down.new_zeros(k - real, down.shape[1])], dim=0)
            out_up, out_down, up_back, down_back = self._encode(m, k, up_eff, down)
            quality = metrics.svd_quality(S_all[g], real, Uk, Vk, up_back[:, :real], down_back[:real])
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
