"""`budget` meets its size target and beats uniform truncation on total squared error."""

import os

import pytest
import torch
from safetensors.torch import save_file

from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.engine.reduce.budget import MIB, BudgetItem, allocate
from lorad.errors import ReduceError
from tests import lora_factory as lf


def _file(path):
    """Modules whose spectra decay at very different rates: where a global budget pays off."""
    g, tensors = torch.Generator().manual_seed(7), {}
    for i in range(8):
        out, inp, r = (256, 128, 32) if i % 2 else (128, 128, 32)
        up, down = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
        down *= torch.logspace(0, -0.3 - 0.5 * i, r)[:, None] * (1 + i)
        tensors[f"lora_unet_m{i}.lora_up.weight"] = up.half()
        tensors[f"lora_unet_m{i}.lora_down.weight"] = down.half()
        tensors[f"lora_unet_m{i}.alpha"] = torch.tensor(16.0, dtype=torch.float16)
    save_file(tensors, str(path))
    return path


def _total_error(src, out):
    before, after = lf.effective_deltas(src), lf.effective_deltas(out)
    return sum(float((before[m] - after[m]).norm() ** 2) for m in before)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_budget_meets_target_and_beats_uniform(tmp_path, fraction):
    src = _file(tmp_path / "l.safetensors")
    target_mb = os.path.getsize(src) * fraction / MIB
    report = reduce_file(src, tmp_path / "b.safetensors", ReduceSettings("budget", budget_mb=target_mb))
    size = os.path.getsize(tmp_path / "b.safetensors")
    assert size <= target_mb * MIB
    assert len({m.rank_out for m in report.modules}) > 1
    # The largest uniform rank whose file also fits the target.
    best_uniform = None
    for k in range(32, 0, -1):
        out = tmp_path / f"u{k}.safetensors"
        reduce_file(src, out, ReduceSettings("rank", k))
        if os.path.getsize(out) <= target_mb * MIB:
            best_uniform = out
            break
    assert best_uniform is not None
    assert _total_error(src, tmp_path / "b.safetensors") < _total_error(src, best_uniform)


def test_unreachable_budget_is_a_clear_error_and_writes_nothing(tmp_path):
    src = _file(tmp_path / "l.safetensors")
    with pytest.raises(ReduceError, match="below the smallest file"):
        reduce_file(src, tmp_path / "b.safetensors", ReduceSettings("budget", budget_mb=0.001))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_allocate_takes_best_value_per_byte_and_keeps_prefixes():
    cheap = BudgetItem(torch.tensor([4.0, 3.0, 2.0, 1.0]), cap=4, bytes_per_rank=10)
    costly = BudgetItem(torch.tensor([5.0, 4.5, 4.0]), cap=3, bytes_per_rank=40)
    # Rank 1 each costs 50. Per byte: cheap 0.9, 0.4, 0.1; costly 0.506, 0.4.
    assert allocate([cheap, costly], 0, 110) == [3, 2]  # 0.9, 0.506, 0.4 (cheap)
    assert allocate([cheap, costly], 0, 70) == [3, 1]  # costly's 40 bytes do not fit: skipped, cheap's next taken
    assert allocate([cheap, costly], 0, 150) == [3, 3]
    assert allocate([cheap, costly], 0, 1000) == [4, 3]  # caps hold
