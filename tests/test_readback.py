"""The engine reads every file it writes back before publishing it, and holds it to its report;
a CUDA out-of-memory is never a failed reduction; nothing non-regular is ever opened."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorad.engine import readback
from lorad.engine._job import FAKE_OOM_ENV, Job
from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.engine.formats import detect, encode, output_metadata, writer
from lorad.engine.formats.lora import open_lora
from lorad.errors import ReduceError
from tests import lora_factory as lf

FRO = ReduceSettings("fro", 0.9)


def _write(source, settings: ReduceSettings, enc: encode.Encoding, dst: Path, check=readback.check_written,
           edit=lambda reports: reports) -> writer.Written:
    """Reduce and write as the engine does; `check(source, temp path, reports, layout, enc)` judges
    the temp output, `edit` may change the reports before it does."""
    provenance = output_metadata.provenance_keys("0" * 64, settings.method, settings.param, {})
    with writer.LoraWriter(source, enc, dst) as out:
        reports = edit(Job(source, settings, torch.device("cpu"), enc, None, None, []).reduce(out.put))
        return out.finish(provenance, lambda tmp, layout: check(source, tmp, reports, layout, enc))


def test_the_0_1_encoding_of_diffusers_files_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """lorad 0.1 folded alpha/k into lora_B and left it to metadata to undo: tensor-only loaders
    (ComfyUI, A1111/Forge) read such a file at another strength than diffusers does."""
    source = open_lora(lf.diffusers_file(tmp_path / "d.safetensors"))
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ReduceError, match="tensor-only loaders read scale .* diffusers/PEFT"):
        _write(source, FRO, encode.Encoding(detect.SCALE_ONE, alpha=4.0), dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]  # no output, no temp
    _write(source, FRO, encode.choose_encoding(source, 8), dst)  # the engine's own encoding passes
    assert dst.is_file()


def test_a_report_that_understates_the_error_is_refused(tmp_path: Path) -> None:
    source = open_lora(lf.kohya_file(tmp_path / "k.safetensors"))
    name = source.reducible[0].name

    def understate(reports):
        return dict(reports, **{name: replace(reports[name], rel_error=reports[name].rel_error / 2)})

    with pytest.raises(ReduceError, match=f"{name}: measured error"):
        _write(source, FRO, encode.choose_encoding(source, 16), tmp_path / "o.safetensors", edit=understate)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_peft_config_that_states_other_ranks_is_refused(tmp_path: Path) -> None:
    """PEFT builds each layer at the rank its config states: a config left as it was is a load error."""
    source = open_lora(lf.peft_dir(tmp_path / "adapter"))
    stale = replace(source, peft_config={**source.peft_config, "r": 8, "rank_pattern": {}})

    def write_stale_config_then_check(_source, tmp: Path, reports, layout, enc) -> None:
        (tmp / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
        readback.check_written(stale, tmp, reports, layout, enc)

    with pytest.raises(ReduceError, match="its config says rank 8, its tensors have"):
        _write(source, FRO, encode.choose_encoding(source, 8), tmp_path / "out", write_stale_config_then_check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


SAME_SHAPES = [(f"lora_unet_block_{i}_attn_to_q", 64, 64, 16, ()) for i in range(4)]


def test_a_header_that_locates_other_bytes_than_were_made_for_a_key_is_refused(tmp_path: Path) -> None:
    """The header on disk points module 1's up key at module 0's up factor (same shape and size, so
    the file still opens as a LoRA): the check finds it is not where that factor was written."""
    source = open_lora(lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES))
    first, second = (f"{name}.lora_up.weight" for name, *_ in SAME_SHAPES[:2])

    def swap_then_check(source, tmp: Path, reports, layout, enc) -> None:
        raw = tmp.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        doc = json.loads(raw[8 : 8 + n])
        a, b = doc[first], doc[second]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
        header = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        tmp.write_bytes(raw[:8] + header.ljust(n) + raw[8 + n :])  # the same length: only the places differ
        readback.check_written(source, tmp, reports, layout, enc)

    with pytest.raises(ReduceError, match=f"{SAME_SHAPES[1][0]}: the file holds other factors than were computed"):
        _write(source, ReduceSettings("rank", 4), encode.choose_encoding(source, 4), tmp_path / "o.safetensors",
               swap_then_check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_a_tensor_changed_between_being_made_and_being_written_is_refused(tmp_path: Path) -> None:
    """Each tensor waits in a temp data section until the header can be written: its bytes are
    checked against what was made on their way into the file (here one changes while it waits)."""
    source = open_lora(lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES))
    enc = encode.choose_encoding(source, 16)
    victim = f"{SAME_SHAPES[2][0]}.lora_up.weight"
    with writer.LoraWriter(source, enc, tmp_path / "o.safetensors") as out:
        reports = Job(source, FRO, torch.device("cpu"), enc, None, None, []).reduce(out.put)
        at = out.data.placed[victim].start
        os.pwrite(out.data.fileno(), bytes(255 - x for x in os.pread(out.data.fileno(), 8, at)), at)
        with pytest.raises(ReduceError, match=f"{victim}' changed between being made and being written"):
            out.finish(output_metadata.provenance_keys("0" * 64, "fro", 0.9, {}),
                       lambda tmp, layout: readback.check_written(source, tmp, reports, layout, enc))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_bytes_on_disk_that_differ_from_what_was_written_are_refused(tmp_path: Path, monkeypatch) -> None:
    """What a loader reads is the disk: the writer reads the whole file back before publishing it.
    Here the filesystem's copy flips a byte on its way (a lossy network or FUSE filesystem)."""
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    real = os.copy_file_range

    def lossy(src_fd: int, dst_fd: int, count: int, offset_src: int | None = None, *rest) -> int:
        n = real(src_fd, dst_fd, count, offset_src, *rest)
        end = os.lseek(dst_fd, 0, os.SEEK_CUR)
        with open(f"/proc/self/fd/{dst_fd}", "rb") as written:  # the file is open write-only here
            last = written.read()[-1]
        os.pwrite(dst_fd, bytes([255 - last]), end - 1)
        return n

    monkeypatch.setattr(os, "copy_file_range", lossy)
    with pytest.raises(ReduceError, match="o.safetensors: its data as read back from disk is not what was written"):
        reduce_file(src, tmp_path / "o.safetensors", FRO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_the_output_is_the_same_where_the_kernel_cannot_copy_between_files(tmp_path: Path, monkeypatch) -> None:
    """copy_file_range is refused on some filesystems (EXDEV, ENOSYS, EINVAL): the data section is
    then copied through memory, into the same bytes."""
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    kernel = reduce_file(src, tmp_path / "kernel.safetensors", FRO)

    def refused(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    copied = reduce_file(src, tmp_path / "copied.safetensors", FRO)
    assert (tmp_path / "kernel.safetensors").read_bytes() == (tmp_path / "copied.safetensors").read_bytes()
    assert kernel.output.sha256 == copied.output.sha256


def test_out_of_memory_halves_the_batch_and_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    plain = reduce_file(src, tmp_path / "plain.safetensors", FRO)
    monkeypatch.setenv(FAKE_OOM_ENV, "1")  # a batch of more than one module "does not fit"
    halved = reduce_file(src, tmp_path / "halved.safetensors", FRO)
    assert any("out of memory: a batch of 4 modules" in n for n in halved.notes)
    assert any("batches of 1 and 1" in n for n in halved.notes)
    assert [m.rank_out for m in halved.modules] == [m.rank_out for m in plain.modules]
    a, b = lf.effective_deltas(tmp_path / "plain.safetensors"), lf.effective_deltas(tmp_path / "halved.safetensors")
    assert max(lf.rel_diff(a[n], b[n]) for n in a) < 1e-6


def test_a_module_that_never_fits_sends_the_file_to_the_cpu(tmp_path: Path, monkeypatch) -> None:
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    monkeypatch.setenv(FAKE_OOM_ENV, "0")  # not even one module "fits" on the first device
    report = reduce_file(src, tmp_path / "o.safetensors", FRO)
    assert report.device == "cpu"
    assert any("the file was reduced on the CPU instead" in n for n in report.notes)
    assert all(m.fro_retained >= 0.9 - 1e-9 for m in report.modules)


def test_a_fifo_is_refused_at_once_never_opened_for_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "lorad", "reduce", str(fifo)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "a FIFO (named pipe), not a regular file" in done.stderr and done.stderr.count("\n") == 1
