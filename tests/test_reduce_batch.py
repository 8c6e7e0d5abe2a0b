"""`lorad reduce A B DIR/ -o OUTDIR`: many files and whole folders in one run, as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from tests import lora_factory as lf


def _lorad(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorad", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _library(root: Path) -> dict[str, Path]:
    """A folder as users keep one: loose files, a subfolder, a PEFT adapter, junk, an earlier output."""
    (root / "sdxl").mkdir(parents=True)
    made = {
        "kohya": lf.kohya_file(root / "style.safetensors"),
        "sdxl": lf.kohya_file(root / "sdxl" / "char.safetensors", lf.SDXL_KOHYA, seed=4),
        "diffusers": lf.diffusers_file(root / "sdxl" / "diff.safetensors"),
        "peft": lf.peft_dir(root / "llm_adapter"),
    }
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (root / "notes.txt").write_text("not a LoRA")
    done = _lorad("reduce", made["kohya"], "-o", root / "style.rank4.safetensors", "--method", "rank", "--param", 4)
    assert done.returncode == 0, done.stderr
    return made


def test_a_folder_into_an_output_folder_keeps_names_and_layout(tmp_path: Path) -> None:
    made = _library(tmp_path / "loras")
    out = tmp_path / "small"
    done = _lorad("reduce", tmp_path / "loras", "-o", out, "--method", "fro", "--param", 0.9)
    assert done.returncode == 2, "a file failed, so the run must say so in its status"
    rows = done.stdout.splitlines()
    assert rows[0].split()[:2] == ["status", "size"]
    assert sum(r.startswith("ok ") for r in rows) == 4, done.stdout
    failed = [r for r in rows if r.startswith("FAILED")]
    assert len(failed) == 1 and "broken.safetensors" in failed[0] and "truncated" in failed[0]
    assert failed[0].count("broken.safetensors") == 1, "the file is named once per row"
    skipped = [r for r in rows if r.startswith("skipped")]
    assert len(skipped) == 1 and "style.rank4.safetensors" in skipped[0] and "lorad output" in skipped[0]
    assert rows[-1].startswith("4 reduced, 1 failed")
    assert (out / "style.safetensors").is_file() and (out / "sdxl" / "char.safetensors").is_file()
    assert (out / "sdxl" / "diff.safetensors").is_file()
    assert (out / "llm_adapter" / "adapter_config.json").is_file()
    assert not (out / "broken.safetensors").exists() and not (out / "notes.txt").exists()
    with safe_open(str(out / "sdxl" / "char.safetensors"), "pt") as f:
        assert f.metadata()["lorad.method"] == "fro"
    for original in made.values():
        assert original.exists()


def test_json_lines_one_object_per_file(tmp_path: Path) -> None:
    made = _library(tmp_path / "loras")
    done = _lorad("reduce", made["kohya"], made["diffusers"], tmp_path / "loras" / "broken.safetensors",
                  "--method", "rank", "--param", 2, "--json")
    assert done.returncode == 2
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(d["input"]["path"]).name for d in docs] == ["style.safetensors", "diff.safetensors",
                                                            "broken.safetensors"]
    assert all(m["rank_out"] <= 2 for d in docs[:2] for m in d["modules"])
    assert Path(docs[0]["output"]["path"]).name == "style.rank2.safetensors"  # beside the input without -o
    assert "error" in docs[2] and "truncated" in docs[2]["error"]


def test_plan_over_a_folder_writes_nothing(tmp_path: Path) -> None:
    _library(tmp_path / "loras")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = _lorad("plan", tmp_path / "loras", "--method", "fro", "--param", 0.8, "--json")
    assert done.returncode == 2  # the broken file
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert sum(1 for d in docs if d.get("output", 1) is None) == 4
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_two_inputs_with_one_name_do_not_overwrite_each_other(tmp_path: Path) -> None:
    a = lf.kohya_file((tmp_path / "a").mkdir() or tmp_path / "a" / "x.safetensors")
    b = lf.kohya_file((tmp_path / "b").mkdir() or tmp_path / "b" / "x.safetensors", seed=9)
    done = _lorad("reduce", a, b, "-o", tmp_path / "out", "--method", "rank", "--param", 2)
    assert done.returncode == 2, "the second file was not reduced: the run must say so in its status"
    assert "would overwrite the output of" in done.stdout
    with safe_open(str(tmp_path / "out" / "x.safetensors"), "pt") as f:
        assert f.metadata()["lorad.source_sha256"] == lf_sha(a)


def lf_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
