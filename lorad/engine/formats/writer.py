"""Write a reduced LoRA in its input's own format: same keys in the same order, new factors,
honest metadata.

Modules are handed over as they are made (`LoraWriter.put`) and go straight to a temp data section
on disk (lorad.engine.formats.data_section), so a reduction holds no more of its output in memory
than the batch in hand. `finish` writes the header and the data in the input's key order, reads
the whole file back from disk to prove it holds exactly the bytes made, hands it to a check, and
only then renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from lorad._atomic import replacing
from lorad._fileio import open_regular
from lorad.engine.formats import detect
from lorad.engine.formats.data_section import DataSection, Placed
from lorad.engine.formats.encode import TORCH_TO_ST, Encoding
from lorad.engine.formats.lora import PEFT_CONFIG, PEFT_WEIGHTS, LoraSource, Module
from lorad.engine.formats.output_metadata import Reduced, build_metadata, peft_config
from lorad.engine.formats.safetensors_file import RawTensor, file_hashes, file_prefix, legacy_hash
from lorad.errors import OutputWriteError, ReduceError

_LEGACY_PLACEHOLDER = "0" * 8


@dataclass(frozen=True)
class ModuleOutput:
    module: Module
    rank: int
    up: torch.Tensor  # in the output dtype and layout, scale already folded
    down: torch.Tensor
    bias: torch.Tensor | None = None  # lora_B.bias, rescaled with the fold so scale * bias is kept


@dataclass(frozen=True)
class Layout:
    """What was written where: each reduced module at its rank, and every key of the file (in the
    header's order) at its place in the data section."""

    modules: dict[str, Reduced]
    entries: dict[str, Placed]


@dataclass(frozen=True)
class Written:
    path: Path  # the file or PEFT directory written
    weights: Path  # its safetensors file
    bytes: int  # of the safetensors file
    sha256: str  # of the safetensors file, as read back from disk


def raw(t: torch.Tensor) -> RawTensor:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return RawTensor(TORCH_TO_ST[t.dtype], tuple(t.shape), flat.view(torch.uint8).numpy().data)


def _alpha_raw(value: float, dtype: torch.dtype) -> RawTensor:
    t = torch.tensor(value, dtype=dtype)
    if float(t) != value:  # e.g. a bf16 alpha key cannot hold 257: never write a rounded alpha
        t = torch.tensor(value, dtype=torch.float32)
    return raw(t)


@dataclass(frozen=True)
class _Keys:
    """The keys one reduced module is written under."""

    up: str
    down: str
    bias: str | None
    alpha: str | None
    replaces: tuple[str, ...] = ()  # a module rebuilt as plain LoRA (from LoHa/LoKr) loses its old keys


def _keys(m: Module, enc: Encoding) -> _Keys:
    alpha = f"{m.name}.alpha" if enc.style == detect.ALPHA_KEYS else None
    if "up" not in m.keys:
        return _Keys(f"{m.name}.lora_up.weight", f"{m.name}.lora_down.weight", None, alpha, tuple(m.keys.values()))
    return _Keys(m.keys["up"], m.keys["down"], m.keys.get("up_bias"), m.keys.get("alpha", alpha))


class LoraWriter:
    """One reduced LoRA on its way to `dst`: `put` each module as it is made, then `finish`."""

    def __init__(self, source: LoraSource, enc: Encoding, dst: Path):
        self.source, self.enc, self.dst = source, enc, dst
        self.modules: dict[str, Reduced] = {}
        with _writing(dst):
            self.data = DataSection(dst.parent)  # the bytes made so far, in the order made

    def put(self, out: ModuleOutput) -> None:
        keys = _keys(out.module, self.enc)
        with _writing(self.dst):
            self._put(keys.up, raw(out.up))
            self._put(keys.down, raw(out.down))
            if out.bias is not None and keys.bias is not None:
                self._put(keys.bias, raw(out.bias))
        self.modules[out.module.name] = Reduced(out.module, out.rank)

    def _put(self, key: str, t: RawTensor) -> None:
        self.data.put(key, t.dtype, t.shape, t.data)

    def finish(self, provenance: dict[str, str],
               check: Callable[[Path, Layout], None] = lambda _path, _layout: None) -> Written:
        """Write the file (or PEFT folder) atomically. `check(temp path, layout)` runs on the complete
        temp file or folder, already proven to hold exactly the bytes made, before it is renamed into
        place; it may refuse it by raising, and then nothing is left behind."""
        with _writing(self.dst):
            layout = self._complete()
            order = list(layout.entries)
            data_sha256 = _sha256(self.data.chunks(order))
            meta = build_metadata(self.source, self.modules, self.enc, provenance)
            if self.source.format != "peft":
                meta = self._with_hashes(layout, meta, data_sha256)
            prefix = _prefix(layout, meta)
            with replacing(self.dst) as tmp:
                weights = tmp
                if self.source.peft_config is not None:
                    tmp.mkdir()
                    _copy_side_files(self.source.path, tmp)
                    weights = tmp / PEFT_WEIGHTS
                sha256 = self._write_file(weights, prefix, order, data_sha256)
                if self.source.peft_config is not None:
                    _write_json(tmp / PEFT_CONFIG, peft_config(self.source, self.modules, self.enc))
                check(tmp, layout)
        return Written(self.dst, self.dst / PEFT_WEIGHTS if self.source.peft_config else self.dst,
                       len(prefix) + self.data.size, sha256)  # fmt: skip

    def _complete(self) -> Layout:
        """Append the new alphas and every tensor passed through; lay the keys out in the header's
        order: the input's, with new alpha keys after their module's down key and a rebuilt module's
        keys in the place of its first old one."""
        header = self.source.header
        inserted: dict[str, list[str]] = {}
        dropped: set[str] = set()
        for r in self.modules.values():
            keys = _keys(r.module, self.enc)
            if keys.alpha is not None:
                self._put(keys.alpha, _alpha_raw(self.enc.written_alpha(r.rank), self.enc.alpha_dtype))
            if keys.replaces:
                dropped.update(keys.replaces)
                first = min(keys.replaces, key=lambda k: header.tensors[k].start)
                inserted[first] = [keys.up, keys.down] + ([keys.alpha] if keys.alpha else [])
            elif keys.alpha is not None and keys.alpha not in header.tensors:
                inserted[keys.down] = [keys.alpha]
        order: list[str] = []
        with open_regular(header.path) as src:
            for key, entry in header.tensors.items():
                if key not in dropped:
                    order.append(key)
                    if key not in self.data:
                        self.data.copy_from(key, entry.dtype, entry.shape, header.path, src.fileno(),
                                            header.data_offset + entry.start, entry.nbytes)  # fmt: skip
                order += inserted.get(key, ())
        return Layout(dict(self.modules), self.data.lay_out(order))

    def _with_hashes(self, layout: Layout, meta: dict[str, str], data_sha256: str) -> dict[str, str]:
        """sshs_model_hash is the data section's hash, known before the header it is written into.
        sshs_legacy_hash covers the final file's bytes at 1 MiB: computed over the layout with a
        fixed-length placeholder, then filled in."""
        meta = dict(meta, sshs_model_hash=data_sha256, sshs_legacy_hash=_LEGACY_PLACEHOLDER)
        if "modelspec.hash_sha256" in meta:
            meta["modelspec.hash_sha256"] = "0x" + data_sha256
        meta["sshs_legacy_hash"] = legacy_hash(chain([_prefix(layout, meta)], self.data.chunks(list(layout.entries))))
        return meta

    def _write_file(self, path: Path, prefix: bytes, order: list[str], data_sha256: str) -> str:
        """Header, then the data section copied in the kernel; fsync; then read it all back: the
        sha256 returned is that of the bytes on disk, which must be the header and data made."""
        with open(path, "wb") as f:
            f.write(prefix)
            f.flush()
            self.data.copy_to(f.fileno(), order)
            os.fsync(f.fileno())
        with open_regular(path) as f:
            head = f.read(len(prefix))
        whole, data = file_hashes(path, len(prefix))
        if head != prefix or data != data_sha256:
            part = "header" if head != prefix else "data"
            raise ReduceError(f"refusing to publish {self.dst}: its {part} as read back from disk is not "
                              "what was written")  # fmt: skip
        return whole

    def close(self) -> None:
        self.data.close()

    def __enter__(self) -> LoraWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prefix(layout: Layout, meta: dict[str, str]) -> bytes:
    return file_prefix({k: (p.dtype, p.shape, p.start, p.end) for k, p in layout.entries.items()}, meta)


def _sha256(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@contextmanager
def _writing(dst: Path) -> Iterator[None]:
    """OSError while writing (a full disk, a file too large, a read-only folder) -> OutputWriteError."""
    try:
        yield
    except OSError as e:
        raise OutputWriteError(f"{dst}: cannot write the output: {e.strerror or e}") from e


def _copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    for item in src_dir.iterdir():
        if item.name in (PEFT_WEIGHTS, PEFT_CONFIG) or not item.is_file():
            continue
        shutil.copy2(item, dst_dir / item.name)


def _write_json(path: Path, doc: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
