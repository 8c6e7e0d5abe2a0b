"""Real clients load what lorad writes, and get exactly the update lorad computed.

A tiny offline SD pipeline (tests/_tiny_models.py) carries planted LoRAs in three formats: a genuine
diffusers file (save_lora_weights + adapter metadata), a kohya file (per-module alpha != rank) and a
PEFT adapter directory. lorad reduces each one; then diffusers' `load_lora_weights` or PEFT's
`PeftModel.from_pretrained` loads the result into a FRESH model, and the delta each LoRA layer adds
must equal the delta the reduced file means by its format's rules, computed here independently.
The report's per-module claims are checked against the original file the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorad.engine.engine import ReduceSettings, reduce_file
from tests import _tiny_models as tm

torch.set_num_threads(2)

FRO = 0.9
RANK = 4
LOADERS = {"diffusers": tm.load_with_diffusers, "kohya": tm.load_with_diffusers, "peft": tm.load_with_peft}


@pytest.fixture(scope="module")
def trained() -> tm.StableDiffusionPipeline:
    """The tiny pipeline with its planted adapters: what the LoRA files were saved from."""
    return tm.trained_pipeline()


@pytest.fixture(scope="module")
def originals(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The un-reduced LoRAs, built once for the module (about a second)."""
    folder = tmp_path_factory.mktemp("originals")
    pipe = trained
    return {
        "diffusers": tm.write_diffusers_lora(pipe, folder),
        "kohya": tm.write_kohya_lora(pipe, folder / "tiny_kohya.safetensors"),
        "peft": tm.write_peft_dir(folder / "tiny_peft"),
        "diffusers-no-metadata": tm.write_diffusers_lora(pipe, folder, with_metadata=False),
        "kohya-no-alpha": tm.write_kohya_lora(pipe, folder / "tiny_kohya_noalpha.safetensors", with_alpha=False),
    }


ReduceFn = Callable[..., tuple[Path, dict]]


@pytest.fixture(scope="module")
def reduced(originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ReduceFn:
    """reduced(kind, method, param) -> (output path, report JSON), each made once by the engine API."""
    folder = tmp_path_factory.mktemp("reduced")
    made: dict[tuple, tuple[Path, dict]] = {}

    def reduce(kind: str, method: str, param: float, dtype: str | None = None) -> tuple[Path, dict]:
        key = (kind, method, param, dtype)
        if key not in made:
            src = originals[kind]
            dst = folder / (f"{kind}.{method}{param}{dtype or ''}" + ("" if src.is_dir() else ".safetensors"))
            report = reduce_file(src, dst, ReduceSettings(method=method, param=param, dtype=dtype))
            made[key] = dst, report.to_json()
        return made[key]

    return reduce


def assert_report_tells_truth(original: Path, output: Path, report: dict, expected_rank: Callable) -> list[int]:
    """Every module's rank_out is in the file and is the rule's choice; rel_error and fro_retained
    match this test's own measurement against the original file. Returns the ranks, in file order."""
    before, after = tm.file_deltas(original), tm.file_deltas(output)
    by_name = {m["name"]: m for m in report["modules"]}
    assert by_name.keys() == before.keys() == after.keys()
    ranks = []
    for name, old in before.items():
        claim, new = by_name[name], after[name]
        assert claim["skipped"] is None and claim["rank_out"] == new.rank, name
        assert new.rank == expected_rank(old), f"{name}: rank {new.rank}, the rule says {expected_rank(old)}"
        measured = tm.rel_error(old.delta, new.delta)
        assert claim["rel_error"] == pytest.approx(measured, abs=1e-4), name
        retained = tm.best_rank_k_retained(old.delta, new.rank)
        assert claim["fro_retained"] == pytest.approx(retained, abs=1e-5), name
        # the written factors are the best rank-k approximation, not merely some rank-k one
        assert measured == pytest.approx((1 - retained**2) ** 0.5, abs=1e-4), name
        ranks.append(new.rank)
    return ranks


MINIMAL_METADATA = {f"{c}.{k}" for c in ("unet", "text_encoder")
                    for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}  # fmt: skip


def assert_output_rules(kind: str, output: Path) -> None:
    """The encodings every loader reads alike: kohya has ONE alpha for all modules (per-module alphas
    are mis-read by diffusers); diffusers metadata is the minimal set (a full LoraConfig breaks older
    PEFT). The loader comparison catches the consequences; this names the cause."""
    tensors, metadata = tm.read_file(output)
    if kind.startswith("kohya"):
        alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
        downs = [k for k in tensors if k.endswith(".lora_down.weight")]
        assert len(set(alphas)) == 1, f"per-module alphas written: {sorted(set(alphas))}"
        assert len(alphas) == len(downs), "modules without alpha (diffusers < 0.40 mis-scales those)"
    if kind.startswith("diffusers"):
        written = set(json.loads(metadata["lora_adapter_metadata"]))
        assert written <= MINIMAL_METADATA, f"non-minimal adapter metadata: {sorted(written - MINIMAL_METADATA)}"


def fro_rule(module: tm.FileModule) -> int:
    return tm.fro_rank(module.delta, FRO)


def rank_rule(module: tm.FileModule) -> int:
    return min(RANK, module.rank)


# ---------------------------------------------------------------------------------------------
# The checker itself: right on genuine files, and it catches the known wrong encodings


@pytest.mark.parametrize("kind", ["diffusers", "kohya", "peft"])
def test_original_files_load_exactly(originals: dict[str, Path], kind: str) -> None:
    """The independent reader agrees with the real loader on the un-reduced files."""
    meant = tm.file_deltas(originals[kind])
    assert len(meant) == (48 if kind == "peft" else 56)  # 6 transformer blocks x 8 (+ 2 TE layers x 4)
    assert tm.mismatches(meant, LOADERS[kind](originals[kind])) == []


def test_genuine_files_mean_the_trained_adapter(trained, originals: dict[str, Path]) -> None:
    """diffusers (with metadata) and kohya (with alphas) files carry the trained update, scale included."""
    adapter = tm.loaded_deltas(unet=trained.unet, text_encoder=trained.text_encoder)
    for kind in ("diffusers", "kohya"):
        assert tm.mismatches(tm.file_deltas(originals[kind]), adapter) == [], kind


def test_checker_flags_per_module_alphas(originals: dict[str, Path], tmp_path: Path) -> None:
    """Negative control: kohya's dynamic encoding (alpha_i = scale*k_i) is mis-read by diffusers and
    the comparison says so; the same deltas under one constant alpha load exactly."""
    per_module = tm.write_kohya_dynamic(originals["kohya"], tmp_path / "per_module.safetensors", FRO, True)
    constant = tm.write_kohya_dynamic(originals["kohya"], tmp_path / "constant.safetensors", FRO, False)
    meant = tm.file_deltas(per_module)
    same_meaning = {n: tm.rel_error(m.delta, tm.file_deltas(constant)[n].delta) for n, m in meant.items()}
    assert max(same_meaning.values()) < 1e-6  # the two files differ in encoding only
    assert tm.mismatches(meant, tm.load_with_diffusers(constant)) == []
    assert len({m.rank for m in meant.values()}) > 3  # genuinely mixed ranks
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):  # diffusers' bug
        problems = tm.mismatches(meant, tm.load_with_diffusers(per_module))
    assert any("loaded delta off" in p for p in problems)
    with pytest.raises(AssertionError, match="per-module alphas"):
        assert_output_rules("kohya", per_module)
    assert_output_rules("kohya", constant)


def test_checker_flags_stale_metadata(originals: dict[str, Path], tmp_path: Path) -> None:
    """Negative control: reduced tensors under the original r=16 metadata do not load."""
    stale = tm.write_diffusers_stale_metadata(originals["diffusers"], tmp_path / "stale.safetensors", FRO)
    with pytest.raises(RuntimeError, match="size mismatch"):
        tm.load_with_diffusers(stale)
    with pytest.raises(AssertionError, match="non-minimal adapter metadata"):
        assert_output_rules("diffusers", stale)  # the full LoraConfig that save_lora_weights wrote


# ---------------------------------------------------------------------------------------------
# lorad's output in the real loaders


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_fro_reduced_file_loads_exactly_in_diffusers(originals, reduced, kind: str) -> None:
    output, report = reduced(kind, "fro", FRO)
    ranks = assert_report_tells_truth(originals[kind], output, report, fro_rule)
    assert len(set(ranks)) > 3, "the planted spectra should give mixed ranks"
    assert_output_rules(kind, output)
    assert tm.mismatches(tm.file_deltas(output), tm.load_with_diffusers(output)) == []


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_rank_reduced_file_loads_exactly_in_diffusers(originals, reduced, kind: str) -> None:
    output, report = reduced(kind, "rank", RANK)
    ranks = assert_report_tells_truth(originals[kind], output, report, rank_rule)
    assert set(ranks) == {RANK}
    assert_output_rules(kind, output)
    assert tm.mismatches(tm.file_deltas(output), tm.load_with_diffusers(output)) == []


@pytest.mark.parametrize(
    ("kind", "dtype"), [("diffusers-no-metadata", None), ("kohya-no-alpha", None), ("kohya", "fp16")]
)
def test_other_real_variants_load_exactly_in_diffusers(originals, reduced, kind: str, dtype: str | None) -> None:
    """Files without metadata or alphas (scale 1) and fp16 output, as most shared LoRAs are."""
    output, report = reduced(kind, "fro", FRO, dtype)
    ranks = assert_report_tells_truth(originals[kind], output, report, fro_rule)
    assert len(set(ranks)) > 3
    assert_output_rules(kind, output)
    assert tm.mismatches(tm.file_deltas(output), tm.load_with_diffusers(output)) == []


def test_fro_reduced_peft_dir_loads_exactly_with_peft_model(originals, reduced) -> None:
    output, report = reduced("peft", "fro", FRO)
    ranks = assert_report_tells_truth(originals["peft"], output, report, fro_rule)
    assert len(set(ranks)) > 3
    loaded = tm.load_with_peft(output)
    meant = tm.file_deltas(output)
    assert tm.mismatches(meant, loaded) == []  # includes: each module instantiated at its own rank
    assert {loaded[m.target].rank for m in meant.values()} == set(ranks)


def test_cli_json_kohya_reduction_loads_exactly(originals: dict[str, Path], tmp_path: Path) -> None:
    """The command users run: `python -m lorad reduce ... --json`, then diffusers loads the output."""
    output = tmp_path / "cli.safetensors"
    cmd = [sys.executable, "-m", "lorad", "reduce", str(originals["kohya"]), "-o", str(output),
           "--method", "fro", "--param", str(FRO), "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["output"]["path"] == str(output)
    assert_report_tells_truth(originals["kohya"], output, report, fro_rule)
    assert tm.mismatches(tm.file_deltas(output), tm.load_with_diffusers(output)) == []
