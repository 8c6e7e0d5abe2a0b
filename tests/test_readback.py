"""The engine reads every file it writes back before publishing it, and holds it to its report;
a CUDA out-of-memory is never a failed reduction; nothing non-regular is ever opened."""

from __future__ import annotations

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
from lorad.engine.formats import detect, encode, writer
from lorad.engine.formats.lora import open_lora
from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import ReduceError
from tests import lora_factory as lf

FRO = ReduceSettings("fro", 0.9)


def _reduce_with(src: Path, enc: encode.Encoding):
    source = open_lora(src)
    reports, outputs = Job(source, FRO, torch.device("cpu"), enc, None, None, []).reduce()
    return source, reports, outputs


def _write_checked(source, outputs, enc, dst: Path, reports) -> None:
    provenance = writer.provenance_keys("0" * 64, "fro", 0.9, {})
    writer.write_lora(source, outputs, enc, dst, provenance,
                      lambda p, data: readback.check_written(source, p, reports, outputs, enc, data))


def test_the_0_1_encoding_of_diffusers_files_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """lorad 0.1 folded alpha/k into lora_B and left it to metadata to undo: tensor-only loaders
    (ComfyUI, A1111/Forge) read such a file at another strength than diffusers does."""
    src = lf.diffusers_file(tmp_path / "d.safetensors")
    old_way = encode.Encoding(detect.SCALE_ONE, alpha=4.0)
    source, reports, outputs = _reduce_with(src, old_way)
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ReduceError, match="tensor-only loaders read scale .* diffusers/PEFT"):
        _write_checked(source, outputs, old_way, dst, reports)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]  # no output, no temp
    right = encode.choose_encoding(source, 8)
    source, reports, outputs = _reduce_with(src, right)
    _write_checked(source, outputs, right, dst, reports)  # the engine's own encoding passes
    assert dst.is_file()


def test_a_report_that_understates_the_error_is_refused(tmp_path: Path) -> None:
    src = lf.kohya_file(tmp_path / "k.safetensors")
    source = open_lora(src)
    enc = encode.choose_encoding(source, 16)
    reports, outputs = Job(source, FRO, torch.device("cpu"), enc, None, None, []).reduce()
    name = next(iter(reports))
    reports[name] = replace(reports[name], rel_error=reports[name].rel_error / 2)
    with pytest.raises(ReduceError, match=f"{name}: measured error"):
        _write_checked(source, outputs, enc, tmp_path / "o.safetensors", reports)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_peft_config_that_states_other_ranks_is_refused(tmp_path: Path) -> None:
    """PEFT builds each layer at the rank its config states: a config left as it was is a load error."""
    src = lf.peft_dir(tmp_path / "adapter")
    source = open_lora(src)
    enc = encode.choose_encoding(source, 8)
    reports, outputs = Job(source, FRO, torch.device("cpu"), enc, None, None, []).reduce()
    stale = replace(source, peft_config={**source.peft_config, "r": 8, "rank_pattern": {}})

    def write_stale_config(tmp: Path, data) -> None:
        (tmp / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
        readback.check_written(stale, tmp, reports, outputs, enc, data)

    provenance = writer.provenance_keys("0" * 64, "fro", 0.9, {})
    with pytest.raises(ReduceError, match="its config says rank 8, its tensors have"):
        writer.write_lora(source, outputs, enc, tmp_path / "out", provenance, write_stale_config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


SAME_SHAPES = [(f"lora_unet_block_{i}_attn_to_q", 64, 64, 16, ()) for i in range(4)]


def test_a_written_tensor_that_is_not_the_computed_one_is_refused(tmp_path: Path) -> None:
    """The writer puts module 0's up factor under module 1's key (same shape, so the file still
    opens as a LoRA): the check finds the bytes the header locates are not what was computed."""
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    source = open_lora(src)
    enc = encode.choose_encoding(source, 4)
    reports, outputs = Job(source, ReduceSettings("rank", 4), torch.device("cpu"), enc, None, None, []).reduce()
    first, second = list(outputs)[:2]
    mixed_up = dict(outputs, **{second: replace(outputs[second], up=outputs[first].up)})
    provenance = writer.provenance_keys("0" * 64, "rank", 4, {})
    with pytest.raises(ReduceError, match=f"{second}: the file holds other factors than were computed"):
        writer.write_lora(source, mixed_up, enc, tmp_path / "o.safetensors", provenance,
                          lambda p, data: readback.check_written(source, p, reports, outputs, enc, data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_bytes_on_disk_that_differ_from_what_was_written_are_refused(tmp_path: Path) -> None:
    """The data is checked in memory, but what a loader reads is the disk: a tensor changed on
    disk after the write is caught."""
    src = lf.kohya_file(tmp_path / "k.safetensors", SAME_SHAPES)
    enc = encode.choose_encoding(open_lora(src), 16)
    source, reports, outputs = _reduce_with(src, enc)
    victim = f"{SAME_SHAPES[2][0]}.lora_up.weight"

    def change_on_disk_then_check(tmp: Path, data) -> None:
        header = read_header(tmp)
        at = header.data_offset + header.tensors[victim].start
        with open(tmp, "r+b") as f:
            f.seek(at)
            flipped = bytes(255 - x for x in f.read(8))
            f.seek(at)
            f.write(flipped)
        readback.check_written(source, tmp, reports, outputs, enc, data)

    provenance = writer.provenance_keys("0" * 64, "fro", 0.9, {})
    with pytest.raises(ReduceError, match=f"{SAME_SHAPES[2][0]}: the file on disk holds other factors"):
        writer.write_lora(source, outputs, enc, tmp_path / "o.safetensors", provenance, change_on_disk_then_check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


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
