"""The CUDA path equals the CPU path within fp32 tolerance (collected only where CUDA exists:
see conftest.py; CI has no GPU, so these run on GPU hosts only)."""

import torch

from lorad.engine.engine import ReduceSettings, reduce_file
from tests import lora_factory as lf


def test_cuda_matches_cpu(tmp_path):
    assert torch.cuda.is_available()
    src = lf.kohya_file(tmp_path / "x.safetensors", lf.SDXL_KOHYA + lf.SD15_KOHYA)
    cpu = reduce_file(src, tmp_path / "cpu.safetensors", ReduceSettings("fro", 0.9, device="cpu"))
    gpu = reduce_file(src, tmp_path / "gpu.safetensors", ReduceSettings("fro", 0.9, device="cuda"))
    assert gpu.device.startswith("cuda")
    assert [m.rank_out for m in gpu.modules] == [m.rank_out for m in cpu.modules]
    a, b = lf.effective_deltas(tmp_path / "cpu.safetensors"), lf.effective_deltas(tmp_path / "gpu.safetensors")
    for name in a:
        assert lf.rel_diff(a[name], b[name]) < 1e-5, name


def test_auto_picks_cuda(tmp_path):
    src = lf.kohya_file(tmp_path / "x.safetensors")
    assert reduce_file(src, None, ReduceSettings("rank", 4)).device.startswith("cuda")
