"""Each method keeps the minimal rank its definition asks for, checked against a dense full SVD."""

import math

import pytest
import torch
from safetensors.torch import save_file

from lorad.engine.engine import ReduceSettings, plan_file, reduce_file
from lorad.engine.reduce.select import select_rank
from tests import lora_factory as lf

SHAPES = [(64, 64, 16), (96, 48, 16), (40, 80, 12), (32, 32, 8), (128, 64, 16), (48, 48, 24)]


def _file(path, seed=0):
    g, tensors = torch.Generator().manual_seed(seed), {}
    for i, (out, inp, r) in enumerate(SHAPES):
        up, down = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
        down *= torch.logspace(0, -1.5 - 0.3 * i, r)[:, None]  # a different decay per module
        tensors[f"lora_unet_m{i}.lora_up.weight"] = up
        tensors[f"lora_unet_m{i}.lora_down.weight"] = down
        tensors[f"lora_unet_m{i}.alpha"] = torch.tensor(float(r) / (1 + i % 3))
    save_file(tensors, str(path))
    return path


def _dense_spectra(path):
    """Module -> singular values of the dense dW (float64, full SVD): the reference."""
    return {m: torch.linalg.svdvals(dw) for m, dw in lf.effective_deltas(path).items()}


def _reference_rank(S, method, p, r):
    """The definitions, spelled out as plainly as possible."""
    S = S[:r].tolist()
    if method == "rank":
        return min(int(p), r)
    if method == "ratio":
        return sum(1 for s in S if s >= S[0] / p)
    total_sq, total = sum(s * s for s in S), sum(S)
    for k in range(1, len(S) + 1):
        if method == "fro" and math.sqrt(sum(s * s for s in S[:k]) / total_sq) >= p:
            return k
        if method == "cumulative" and sum(S[:k]) / total >= p:
            return k
    return len(S)


CASES = [("rank", 5), ("rank", 1), ("fro", 0.9), ("fro", 0.5), ("fro", 0.99), ("ratio", 4), ("ratio", 20),
         ("cumulative", 0.7), ("cumulative", 0.95)]


@pytest.mark.parametrize("method,param", CASES)
def test_minimal_rank_matches_full_svd_reference(tmp_path, method, param):
    src = _file(tmp_path / "l.safetensors")
    spectra = _dense_spectra(src)
    report = plan_file(src, ReduceSettings(method, param))
    for m in report.modules:
        want = _reference_rank(spectra[m.name], method, param, m.rank_in)
        assert m.rank_out == want, (m.name, m.rank_out, want)
        kept = spectra[m.name][: m.rank_out]
        assert m.fro_retained == pytest.approx(float(kept.norm() / spectra[m.name].norm()), abs=1e-5)


def test_max_rank_caps_and_no_module_grows(tmp_path):
    src = _file(tmp_path / "l.safetensors")
    report = plan_file(src, ReduceSettings("fro", 0.999, max_rank=6))
    assert all(m.rank_out <= min(6, m.rank_in) for m in report.modules)
    report = plan_file(src, ReduceSettings("rank", 1000))
    assert all(m.rank_out == m.rank_in for m in report.modules)


def test_rank_one_is_allowed(tmp_path):
    report = plan_file(_file(tmp_path / "l.safetensors"), ReduceSettings("fro", 0.3))
    assert min(m.rank_out for m in report.modules) == 1


def _kohya_reference(S_dense, method, p):
    """resize_lora.py's index functions on the dense spectrum (len = min(out, in)), then + 1."""
    n = len(S_dense)
    if method == "ratio":
        index = int((S_dense > S_dense[0] / p).sum())
    elif method == "fro":
        sq = S_dense**2
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), p**2)) + 1
    else:
        index = int(torch.searchsorted(torch.cumsum(S_dense, 0) / S_dense.sum(), p)) + 1
    return max(1, min(index, n - 1)) + 1


@pytest.mark.parametrize("method,param", [("fro", 0.9), ("ratio", 8), ("cumulative", 0.8)])
def test_kohya_compat_reproduces_its_plus_one(tmp_path, method, param):
    src = _file(tmp_path / "l.safetensors")
    spectra = _dense_spectra(src)
    compat = plan_file(src, ReduceSettings(method, param, kohya_compat=True))
    plain = plan_file(src, ReduceSettings(method, param))
    for c, p in zip(compat.modules, plain.modules):
        want = min(_kohya_reference(spectra[c.name], method, param), c.rank_in)
        assert c.rank_out == want
        assert c.rank_out >= 2
    assert sum(c.rank_out for c in compat.modules) > sum(p.rank_out for p in plain.modules)


def test_zero_module_gets_rank_one():
    assert select_rank(torch.zeros(8), "fro", 0.9, 8) == 1
    assert select_rank(torch.zeros(8), "fro", 0.9, 8, kohya_compat=True, dense_len=32) == 1


def test_reported_error_matches_the_written_file(tmp_path):
    src = _file(tmp_path / "l.safetensors")
    report = reduce_file(src, tmp_path / "o.safetensors", ReduceSettings("fro", 0.8))
    before, after = lf.effective_deltas(src), lf.effective_deltas(tmp_path / "o.safetensors")
    for m in report.modules:
        measured = lf.rel_diff(before[m.name], after[m.name])
        assert m.rel_error == pytest.approx(measured, abs=1e-5), m.name
        assert m.energy_retained == pytest.approx(m.fro_retained**2)
