"""Bad input: one clear error line, a non-zero exit, and nothing written (no output, no temp file)."""

import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lorad.cli.cli import main
from tests import lora_factory as lf


def _good(tmp_path):
    return lf.kohya_file(tmp_path / "good.safetensors")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def not_safetensors(tmp_path):
    return _write(tmp_path / "text.safetensors", b"just some text, not a model at all\n" * 4), "header"


def empty_file(tmp_path):
    return _write(tmp_path / "empty.safetensors", b""), "not a safetensors file"


def truncated(tmp_path):
    data = _good(tmp_path).read_bytes()
    (tmp_path / "good.safetensors").unlink()
    return _write(tmp_path / "cut.safetensors", data[: len(data) - 1000]), "truncated"


def header_too_large(tmp_path):
    return _write(tmp_path / "huge.safetensors", struct.pack("<Q", 10**12) + b"{}"), "header claims"


def header_not_json(tmp_path):
    return _write(tmp_path / "bad.safetensors", struct.pack("<Q", 5) + b"{nope"), "not JSON"


def offsets_outside(tmp_path):
    header = b'{"a.lora_up.weight":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}'
    return _write(tmp_path / "lie.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16), "truncated"


def nan_weights(tmp_path):
    up, down = torch.randn(8, 4), torch.randn(4, 8)
    up[2, 1] = float("nan")
    save_file({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down}, str(tmp_path / "nan.safetensors"))
    return tmp_path / "nan.safetensors", "NaN or Inf"


def inf_weights(tmp_path):
    up, down = torch.randn(8, 4), torch.randn(4, 8)
    down[0, 0] = float("inf")
    save_file({"lora_unet_x.lora_up.weight": up, "lora_unet_x.lora_down.weight": down}, str(tmp_path / "inf.safetensors"))
    return tmp_path / "inf.safetensors", "NaN or Inf"


def mismatched_shapes(tmp_path):
    save_file({"lora_unet_x.lora_up.weight": torch.randn(8, 4), "lora_unet_x.lora_down.weight": torch.randn(6, 8)},
              str(tmp_path / "mis.safetensors"))
    return tmp_path / "mis.safetensors", "mismatched shapes"


def orphan_up(tmp_path):
    save_file({"lora_unet_x.lora_up.weight": torch.randn(8, 4)}, str(tmp_path / "orphan.safetensors"))
    return tmp_path / "orphan.safetensors", "no matching down"


def torch_zip_pickle(tmp_path):
    torch.save({"lora_unet_x.lora_up.weight": torch.randn(2, 2)}, tmp_path / "model.pt")
    return tmp_path / "model.pt", "never unpickles"


def raw_pickle_ckpt(tmp_path):
    # A pickle that would run code if loaded: lorad must refuse it without ever unpickling.
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    return _write(tmp_path / "model.ckpt", payload), "never unpickles"


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def not_a_lora(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)},
              str(tmp_path / "full.safetensors"))
    return tmp_path / "full.safetensors", "no LoRA modules"


CASES = [not_safetensors, empty_file, truncated, header_too_large, header_not_json, offsets_outside, nan_weights,
         inf_weights, mismatched_shapes, orphan_up, torch_zip_pickle, raw_pickle_ckpt, not_a_lora]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_gets_one_clear_error_and_writes_nothing(tmp_path, capsys, case):
    path, expected = case(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["reduce", str(path), "--method", "rank", "--param", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lorad: error: ") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file
    assert not (tmp_path / "pwned").exists()


def test_bad_parameters_are_refused_before_any_work(tmp_path, capsys):
    src = _good(tmp_path)
    for args, expected in [(["--method", "fro", "--param", "1.5"], "in (0, 1]"),
                           (["--method", "rank", "--param", "2.5"], "whole rank"),
                           (["--method", "ratio", "--param", "0.5"], ">= 1"),
                           (["--method", "budget"], "--budget-mb"),
                           (["--method", "fro", "--param", "0.9", "--dtype", "int8"], "--dtype")]:
        assert main(["reduce", str(src), *args]) == 2
        assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]


def test_error_in_a_subprocess_is_one_line(tmp_path):
    path, _ = truncated(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lorad", "reduce", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "truncated" in proc.stderr
    assert proc.stdout == ""
