"""`lorad preview`: pictures rendered with a LoRA and with another file from the same seeds, on a real
(tiny) SD1.5 pipeline saved to disk, compared by SSIM and a difference image, in the HTML report.

The pipeline and the LoRA are tests/_tiny_models.py's (random weights, planted LoRA factors, a kohya
file); the variant is lorad's own reduction at rank 2. The pages are opened in headless Chromium
(tests/_browser.py): every picture of the Preview section must be decoded, and the SSIM figures it
shows must be those `--json` printed. The daemon form runs against the real daemon in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from lorad.cli.cli import main
from lorad.engine.effect.preview import DIFF_GAIN, PREVIEW_PROMPTS, compare, render_preview
from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.report.preview import preview_section
from tests import _tiny_models as tm
from tests._browser import chromium, console_errors, missing
from tests._daemon_fixtures import REPO, Daemon, lorad_env, wait_for
from tests._effect_rig import reduced, sd_daemon, socket_of, variant_of

FAST = {"steps": 4}  # the tests that need no particular schedule render 4 steps


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The saved tiny pipeline, a kohya LoRA for it, a byte-for-byte copy and lorad's rank-2 reduction."""
    root = tmp_path_factory.mktemp("preview_sd")
    tm.tiny_pipeline().save_pretrained(root / "base")
    lora = tm.write_kohya_lora(tm.trained_pipeline(), root / "tiny.safetensors")
    copy = root / "copy.safetensors"
    shutil.copyfile(lora, copy)
    reduced_file = root / "tiny.rank2.safetensors"
    reduce_file(lora, reduced_file, ReduceSettings(method="rank", param=2, device="cpu"))
    return SimpleNamespace(root=root, base=root / "base", lora=lora, copy=copy, reduced=reduced_file)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def test_an_identical_copy_gives_ssim_1_and_a_black_difference(sd):
    result = render_preview(sd.lora, sd.copy, sd.base, prompts=["a red house"], seeds=2, **FAST)
    assert [(p.prompt, p.seed) for p in result.pairs] == [("a red house", 1), ("a red house", 2)]
    assert result.ssim_mean == 1.0 and result.ssim_min == 1.0 and all(p.ssim == 1.0 for p in result.pairs)
    for pair in result.pairs:
        assert pair.original_png == pair.other_png and pair.mean_abs_diff == 0 and pair.max_abs_diff == 0
        diff = pixels(pair.diff_png)
        assert diff.shape == (64, 64, 3) and not diff.any()  # the difference image is all zero
        assert pixels(pair.original_png).std() > 0  # a real picture, not a blank
    assert pixels(result.pairs[0].original_png).tobytes() != pixels(result.pairs[1].original_png).tobytes()
    # what was rendered is stated
    assert (result.steps, result.height, result.width, result.device) == (4, 64, 64, "cpu")
    assert result.pipeline == "StableDiffusionPipeline" and len(result.base_sha256) == 64


def test_a_reduced_variant_is_below_1_by_the_library_s_ssim(sd):
    result = render_preview(sd.lora, sd.reduced, sd.base, prompts=["a red house"], seeds=[7], **FAST)
    [pair] = result.pairs
    assert pair.seed == 7 and pair.ssim < 1.0 and pair.max_abs_diff > 0
    a, b = pixels(pair.original_png), pixels(pair.other_png)  # 64 px: shown at full size, exact pixels
    # the figure is scikit-image's SSIM of the two pictures (Wang et al.'s settings), computed again here
    again = structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False)  # fmt: skip
    assert pair.ssim == pytest.approx(again, abs=1e-12)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert pair.mean_abs_diff == pytest.approx(diff.mean()) and pair.max_abs_diff == diff.max()
    assert np.array_equal(pixels(pair.diff_png), np.clip(diff * DIFF_GAIN, 0, 255).astype(np.uint8))
    # the same seed with the original again is the same picture: the difference is the variant's
    same = render_preview(sd.lora, sd.copy, sd.base, prompts=["a red house"], seeds=[7], **FAST)
    assert same.pairs[0].original_png == pair.original_png


def test_large_pictures_are_shown_scaled_and_compared_at_full_size():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    b = a.copy()
    b[500, 300] = 255 - b[500, 300]  # one pixel
    pair = compare(a, b)
    assert pixels(pair.original_png).shape == (512, 384, 3) and pixels(pair.diff_png).shape == (512, 384, 3)
    assert pair.max_abs_diff == int(np.abs(a[500, 300].astype(int) - b[500, 300].astype(int)).max())
    assert pixels(pair.diff_png)[250, 150].any()  # the block maximum keeps the one pixel visible
    assert 0.99 < pair.ssim < 1.0


def test_only_png_data_goes_into_the_page():
    good = {"ssim": 1.0, "prompt": "p", "seed": 1, "original_png": b"\x89PNG\r\n\x1a\nxx",
            "other_png": b"\x89PNG\r\n\x1a\nxx", "diff_png": b"\x89PNG\r\n\x1a\nxx"}  # fmt: skip
    assert "data:image/png;base64," in preview_section({"pairs": [good]})
    with pytest.raises(ValueError, match="not PNG data"):
        preview_section({"pairs": [{**good, "diff_png": b"<svg onload=alert(1)>"}]})


def test_without_the_effect_extra_the_command_says_what_to_install(sd, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    code = main(["preview", str(sd.lora), str(sd.copy), "--base", str(sd.base), "-o", str(sd.root / "no.html")])
    assert code == 2
    err = capsys.readouterr().err
    assert "rendering a preview needs skimage" in err and "pip install 'lorad[effect]'" in err
    assert not (sd.root / "no.html").exists()


def open_page(path: Path) -> dict:
    """The page in headless Chromium: each Preview picture's decoded width, the SSIM figures shown."""
    if missing():
        pytest.skip(missing())
    with chromium() as driver:
        driver.get(path.as_uri())
        seen = driver.execute_script("""
            var imgs = Array.prototype.slice.call(document.querySelectorAll('#preview img'));
            return {widths: imgs.map(function (i) { return i.complete ? i.naturalWidth : -1; }),
                    srcs: imgs.map(function (i) { return i.getAttribute('src').slice(0, 22); }),
                    ssim: Array.prototype.map.call(document.querySelectorAll('#preview .ssim'),
                                                   function (s) { return s.textContent; }),
                    mean: document.getElementById('preview-ssim-mean').textContent,
                    sections: Array.prototype.map.call(document.querySelectorAll('main > section'),
                                                       function (s) { return s.id; })};
        """)  # fmt: skip
        seen["errors"] = console_errors(driver)
    return seen


def check_page(seen: dict, printed: dict) -> None:
    pairs = printed["pairs"]
    assert seen["widths"] == [64] * (3 * len(pairs))  # every picture present and decoded
    assert set(seen["srcs"]) == {"data:image/png;base64,"}  # inline, nothing fetched
    assert seen["ssim"] == [f"{p['ssim']:.4f}" for p in pairs]
    assert seen["mean"] == f"{printed['ssim_mean']:.4f}" and seen["errors"] == []


def test_two_files_write_a_page_whose_pictures_decode_in_chromium(sd, capsys):
    out = sd.root / "two.html"
    code = main(["preview", str(sd.lora), str(sd.reduced), "--base", str(sd.base), "--steps", "4", "--json",
                 "-o", str(out)])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == str(out) and printed["prompts"] == list(PREVIEW_PROMPTS)
    assert printed["seeds"] == [1, 2] and printed["steps"] == 4 and len(printed["pairs"]) == 4
    assert printed["ssim_min"] <= printed["ssim_mean"] < 1
    assert printed["ssim_mean"] == pytest.approx(sum(p["ssim"] for p in printed["pairs"]) / 4)
    html = out.read_text()
    for text in (*PREVIEW_PROMPTS, printed["base_sha256"][:16], str(sd.lora.resolve()), str(sd.reduced.resolve())):
        assert text in html
    assert not re.search(r"(?i)\b(?:https?|file|ftp)://", html)
    seen = open_page(out)
    check_page(seen, printed)
    assert seen["sections"] == ["preview"]


# ---------------------------------------------------------------------------------------------
# The daemon form: the report of a LoRA the daemon holds, with the Preview section


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemon]]:
    tmp = tmp_path_factory.mktemp("preview_daemon")
    with sd_daemon(tmp) as daemon:
        yield tmp, daemon


def test_the_daemon_form_writes_the_lora_s_report_with_the_preview(sd, rig):
    tmp, daemon = rig
    path = tmp / "sd" / "tiny.safetensors"
    shutil.copyfile(sd.lora, tmp / "tiny.partial")
    os.rename(tmp / "tiny.partial", path)  # dropped whole into the watched folder
    entry = wait_for(lambda: reduced(daemon.config, path), 120, 0.2, "tiny.safetensors reduced and activated")
    reduction, original = variant_of(entry, "reduced"), variant_of(entry, "original")

    out = tmp / "report.html"
    done = subprocess.run([sys.executable, "-m", "lorad", "preview", str(path), "--base", str(sd.base), "--json",
                           "--device", "cpu", "--steps", "4", "--seeds", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO),
                          env=lorad_env(LORAD_SOCKET=str(socket_of(tmp)), HF_HUB_OFFLINE="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    printed = json.loads(done.stdout)
    assert (printed["path"], printed["lora"], printed["variant"]) == (str(out), entry["id"], reduction["id"])
    assert printed["lora_path"] == str(path) and printed["reference_variant"] == original["id"]
    assert len(printed["pairs"]) == 2  # 2 prompts x 1 seed
    assert printed["ssim_mean"] < 1  # rank 16 -> 2 changed the pictures

    html = out.read_text()
    assert f"#{reduction['id']} rank 2" in html and f"#{original['id']} original" in html  # the labels
    seen = open_page(out)
    check_page(seen, printed)
    # the LoRA's own report, with the Preview after the variants
    assert seen["sections"][:6] == ["summary", "sizes", "decision", "variants", "preview", "modules"], seen["sections"]

    # an id works as well as a path; without the daemon's socket the command says so in one line
    again = subprocess.run([sys.executable, "-m", "lorad", "preview", "424242", "--base", str(sd.base)],
                           capture_output=True, text=True, timeout=120, cwd=str(REPO),
                           env=lorad_env(LORAD_SOCKET=str(socket_of(tmp)), HF_HUB_OFFLINE="1"))  # fmt: skip
    assert again.returncode == 2 and "no LoRA with id 424242" in again.stderr
