"""The engine's contract: the --json object, default names, atomic output, batching, honesty."""

import json
import resource
import signal
import subprocess
import sys

import pytest
import torch

from lorad.engine.engine import ReduceSettings, default_output_path, plan_file, reduce_file
from lorad.engine.reduce.svd import factored_svd
from tests import lora_factory as lf


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorad", *map(str, args)], capture_output=True, text=True)


def test_json_output_is_the_documented_object(tmp_path):
    src = lf.kohya_file(tmp_path / "my lora.safetensors")
    proc = _cli("reduce", src, "--method", "fro", "--param", "0.9", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"input", "output", "method", "param", "seconds", "modules", "fro_retained_mean"} <= set(doc)
    assert {"path", "sha256", "bytes", "format", "modules"} <= set(doc["input"])
    assert {"path", "sha256", "bytes"} <= set(doc["output"])
    assert doc["output"]["path"] == str(tmp_path / "my lora.fro0.9.safetensors")
    assert doc["input"]["format"] == "kohya" and doc["input"]["modules"] == len(lf.SD15_KOHYA)
    for m in doc["modules"]:
        assert {"name", "kind", "rank_in", "rank_out", "fro_retained", "rel_error", "skipped"} <= set(m)
        assert m["skipped"] is None and m["fro_retained"] >= 0.9 - 1e-9
    kept = [m["fro_retained"] for m in doc["modules"]]
    assert doc["fro_retained_mean"] == pytest.approx(sum(kept) / len(kept))
    import hashlib

    assert hashlib.sha256((tmp_path / "my lora.fro0.9.safetensors").read_bytes()).hexdigest() == doc["output"]["sha256"]


def test_readable_summary_without_json(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors")
    proc = _cli("reduce", src, "--method", "rank", "--param", "4", "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "output" in proc.stdout and "fro retained" in proc.stdout and "over the file" in proc.stdout


def test_plan_writes_nothing_and_agrees_with_reduce(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors", lf.SDXL_KOHYA)
    plan = plan_file(src, ReduceSettings("fro", 0.8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]
    done = reduce_file(src, None, ReduceSettings("fro", 0.8))
    assert [m.rank_out for m in plan.modules] == [m.rank_out for m in done.modules]
    assert plan.output is None
    budget = ReduceSettings("budget", budget_mb=0.05)  # the plan reuses its allocation pass's spectra
    planned = [m.rank_out for m in plan_file(src, budget).modules]
    assert planned == [m.rank_out for m in reduce_file(src, tmp_path / "b.safetensors", budget).modules]
    assert len(set(planned)) > 1


def test_default_output_names():
    from pathlib import Path

    assert default_output_path(Path("/x/a.safetensors"), ReduceSettings("fro", 0.9)).name == "a.fro0.9.safetensors"
    assert default_output_path(Path("/x/a.safetensors"), ReduceSettings("rank", 16)).name == "a.rank16.safetensors"
    assert default_output_path(Path("/x/a.safetensors"), ReduceSettings("budget", budget_mb=64)).name == \
        "a.budget64mb.safetensors"


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    from lorad.cli.cli import main

    src = lf.kohya_file(tmp_path / "k.safetensors")
    before = src.read_bytes()
    assert main(["reduce", str(src), "-o", str(src), "--method", "rank", "--param", "2"]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert src.read_bytes() == before


def _limited_write(limit: int, src: str, dst: str) -> None:
    """Child: reduce with the file size limited, as on a full disk (EFBIG instead of ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from lorad.cli.cli import main

    sys.exit(main(["reduce", src, "-o", dst, "--method", "rank", "--param", "8"]))


def test_a_write_that_fails_midway_leaves_no_output_and_no_temp(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors")
    code = f"import sys; from tests.test_engine import _limited_write; _limited_write(4096, {str(src)!r}, " \
           f"{str(tmp_path / 'o.safetensors')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the output" in proc.stderr and proc.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_batched_decomposition_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    ups, downs = torch.randn(5, 96, 12, generator=g), torch.randn(5, 12, 40, generator=g)
    scales = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.25])
    batched = factored_svd(ups, downs, scales)
    for i in range(5):
        one = factored_svd(ups[i : i + 1], downs[i : i + 1], scales[i : i + 1])
        assert torch.allclose(batched.S[i], one.S[0], rtol=1e-6)
        dense = scales[i] * ups[i] @ downs[i]
        Uk, Sk, Vk = batched.truncate(i, 12)
        rebuilt = (Uk * Sk) @ Vk.T
        assert float((dense - rebuilt).norm() / dense.norm()) < 1e-5


def test_factored_svd_handles_rank_above_the_layer_dims():
    up, down = torch.randn(1, 4, 16), torch.randn(1, 16, 6)  # rank 16 > out 4 and in 6
    svd = factored_svd(up, down, torch.ones(1))
    assert svd.S.shape == (1, 4)
    Uk, Sk, Vk = svd.truncate(0, 4)
    assert torch.allclose((Uk * Sk) @ Vk.T, up[0] @ down[0], atol=1e-4)


def test_tiny_kept_singular_values_still_give_orthonormal_vectors():
    """Kept singular values down to 1e-6 of the largest still give orthonormal vectors and an exact
    rebuild; a zero update has no V from the Gram route (0 / 0) and takes the SVD's vectors."""
    g = torch.Generator().manual_seed(5)
    qb = torch.linalg.qr(torch.randn(80, 4, generator=g, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(60, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 1e-2, 1e-4, 1e-6], dtype=torch.float64)
    ups = torch.stack([(qb * s).float(), torch.zeros(80, 4)])
    downs = torch.stack([qa.T.float(), torch.zeros(4, 60)])
    svd = factored_svd(ups, downs, torch.ones(2))
    Uk, Sk, Vk = svd.truncate(0, 4)
    assert torch.allclose(Vk.T @ Vk, torch.eye(4), atol=1e-6) and torch.allclose(Uk.T @ Uk, torch.eye(4), atol=1e-6)
    dense = ups[0] @ downs[0]
    assert float((dense - (Uk * Sk) @ Vk.T).norm() / dense.norm()) < 1e-6
    Uz, Sz, Vz = svd.truncate(1, 2)
    assert torch.isfinite(Uz).all() and torch.isfinite(Vz).all() and float(Sz.abs().max()) == 0.0


def test_project_reports_its_real_error(tmp_path):
    src = lf.kohya_file(tmp_path / "k.safetensors")
    report = reduce_file(src, tmp_path / "p.safetensors", ReduceSettings("project", 4))
    svd = reduce_file(src, tmp_path / "s.safetensors", ReduceSettings("rank", 4))
    before, after = lf.effective_deltas(src), lf.effective_deltas(tmp_path / "p.safetensors")
    for m, s in zip(report.modules, svd.modules):
        assert m.rel_error == pytest.approx(lf.rel_diff(before[m.name], after[m.name]), rel=1e-4)
        assert m.rel_error >= s.rel_error - 1e-6  # the SVD is the best rank-k approximation
