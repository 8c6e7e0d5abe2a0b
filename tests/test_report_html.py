"""The static HTML reports (lorad.report.html), built from a real reduction and opened in a real
browser: Debian's headless Chromium loads the written file from disk with the network off.

The documents are what the lead's `lorad report` produces: variants with their hashes and policy
decisions (lorad.daemon.worker.decide), modules from the engine's Report.to_json(), and spectra computed
here from the input file. The page must draw its SVG charts (non-empty boxes, bars in proportion),
print the document's numbers, fetch nothing, run no script it did not ship, and sort its table.

Run as `python -m tests.test_report_html docs/report.png` it writes the README's screenshot: an
SDXL-like LoRA (benchmarks/make_sdxl_lora.py --limit 60) reduced with fro 0.9.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorad.daemon.config import Policy
from lorad.daemon.decision import decide
from lorad.engine.engine import ReduceSettings, reduce_file
from lorad.engine.formats.lora import Reader, open_lora
from lorad.report.html import block_of, group_by_block, render_library, render_lora, write_html
from lorad.sizes import human_bytes
from tests import lora_factory as lf
from tests._browser import chromium, console_errors, full_page_screenshot
from tests._store_fixtures import civitai_hashes

# Seven kohya SDXL modules in five blocks (UNet input/middle/output, both text encoders).
SPECS = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 64, 64, 16, ()),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 64, 96, 16, ()),
    ("lora_unet_input_blocks_4_1_proj_in", 64, 64, 16, ()),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj", 128, 64, 16, ()),
    ("lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0", 64, 64, 16, ()),
    ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 48, 48, 8, ()),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1", 96, 48, 8, ()),
]
HOSTILE_FILE = "<img src=x onerror=window.__pwned=1>.safetensors"  # a real file name on disk
HOSTILE_PATH = "/loras/<script>window.__pwned=2</script>.safetensors"  # a path in the data
POLICY = Policy(name="default", method="fro", param=0.9, min_fro_retained=0.85)
URLISH = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://|=\s*[\"']?//|\b(?:src|href|xmlns|action|srcset)\s*=|url\(|@import|@font-face")


# ---------------------------------------------------------------------------------------------
# Documents from real reductions


def variant(vid: int, path: Path, kind: str, active: bool, report: Any = None, decision: Any = None,
            created: str = "2026-11-02T10:00:00+00:00") -> dict[str, Any]:  # fmt: skip
    h = civitai_hashes(path)
    return {
        "id": vid, "kind": kind, "active": active,
        "method": report.method if report else None, "param": report.param if report else None,
        "bytes": path.stat().st_size, "sha256": h["sha256"], "autov2": h["autov2"], "autov3": h["autov3"],
        "blake3": None,
        "fro_retained_file": report.fro_retained_file if report else None,
        "fro_retained_min": report.fro_retained_min if report else None,
        "created_at": created, "rank_rule": None, "serve": None, "servers": [],
        "decision": decision.to_json() if decision else None,
        "unknown_extra_key": {"ignored": True},
    }  # fmt: skip


def spectra_of(src: Path, report: Any, count: int = 6) -> list[dict[str, Any]]:
    """Singular values of scale * up @ down for the largest modules (by parameters), cut where the
    report's rank_out says."""
    by_name = {m.name: m for m in report.modules}
    source = open_lora(src)
    largest = sorted((m for m in source.modules if m.reducible), key=lambda m: -m.params())[:count]
    out = []
    with Reader(source) as reader:
        for m in largest:
            up, down = reader.factors(m)
            values = torch.linalg.svdvals(m.scale * up.double() @ down.double())[: m.rank]
            out.append({"name": m.name, "values": values.tolist(), "cut": by_name[m.name].rank_out})
    return out


def lora_doc(src: Path, reductions: list[tuple[Path, Any, bool]], policy: Policy = POLICY,
             folder: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The `lorad report PATH` document of `src` with its reduced variants (out, report, active)."""
    active_any = any(a for _, _, a in reductions)
    variants = [variant(1, src, "original", not active_any, created="2026-11-02T09:59:00+00:00")]
    for i, (out, report, active) in enumerate(reductions, start=2):
        d = decide(policy, src.stat().st_size, out.stat().st_size, report.fro_retained_file)
        variants.append(variant(i, out, "reduced", active, report, d, f"2026-11-02T10:0{i}:00+00:00"))
    shown = next((i for i, (_, _, a) in enumerate(reductions, start=2) if a), len(reductions) + 1)
    report = reductions[shown - 2][1]
    return {
        "generated_at": "2026-11-02T12:00:00+00:00",
        "lora": {"id": 7, "path": str(src), "folder": folder or str(src.parent), "policy": policy.name},
        "variants": variants,
        "modules": report.to_json()["modules"],
        "shown_variant_id": shown,
        "spectra": spectra_of(src, report),
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("loras")
    src = lf.kohya_file(root / HOSTILE_FILE, specs=SPECS)
    fro_out, rank_out = root / "fro.safetensors", root / "rank1.safetensors"
    fro = reduce_file(src, fro_out, ReduceSettings(method="fro", param=0.9, device="cpu"))
    rank1 = reduce_file(src, rank_out, ReduceSettings(method="rank", param=1, device="cpu"))
    doc = lora_doc(src, [(fro_out, fro, True), (rank_out, rank1, False)],
                   folder=str(root / "<script>window.__pwned=3</script>"))  # fmt: skip
    return {"src": src, "fro": fro, "rank1": rank1, "fro_out": fro_out, "rank_out": rank_out, "doc": doc}


@pytest.fixture(scope="module")
def browser() -> Any:
    with chromium() as driver:
        yield driver


# ---------------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize(("name", "block"), [
    # kohya SD 1.5 / SDXL (lora_factory.SD15_KOHYA, SDXL_KOHYA) and Flux (FLUX_KOHYA)
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_down_blocks_0"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_4"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k", "lora_unet_middle_block_1"),
    ("lora_unet_output_blocks_10_1_proj_out", "lora_unet_output_blocks_10"),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", "lora_te2_text_model_encoder_layers_31"),
    ("lora_unet_double_blocks_3_img_attn_qkv", "lora_unet_double_blocks_3"),
    ("lora_unet_single_blocks_37_linear1", "lora_unet_single_blocks_37"),
    ("lora_unet_blocks_17_self_attn_q", "lora_unet_blocks_17"),  # Wan (make_family_loras)
    # diffusers / PEFT-style keys (DIFFUSERS_MODULES, diffusers_legacy_file, aitoolkit, xlabs, peft)
    ("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", "unet.down_blocks.0"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "unet.mid_block"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora", "unet.mid_block"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder.text_model.encoder.layers.0"),
    ("transformer.single_transformer_blocks.12.attn.to_q", "transformer.single_transformer_blocks.12"),
    ("transformer.transformer_blocks.0.ff.net.0.proj", "transformer.transformer_blocks.0"),
    ("diffusion_model.transformer_blocks.59.img_mlp.net.2", "diffusion_model.transformer_blocks.59"),
    ("double_blocks.0.processor.qkv_lora1", "double_blocks.0"),
    ("blocks.17.cross_attn.k", "blocks.17"),
    ("base_model.model.model.layers.3.self_attn.q_proj", "base_model.model.model.layers.3"),
    ("base_model.model.layers.1.q", "base_model.model.layers.1"),
    # no block index: the family's fallback group
    ("lora_unet_conv_in", "lora_unet (other)"),
    ("lora_unet_time_embedding_linear_1", "lora_unet (other)"),
    ("lora_unet_a_to_q", "lora_unet (other)"),
    ("unet.conv_in", "unet (other)"),
    ("to_q", "other"),
])  # fmt: skip
def test_block_of_real_key_names(name: str, block: str) -> None:
    assert block_of(name) == block


def test_blocks_in_natural_order_with_the_fallback_last() -> None:
    names = ["lora_unet_output_blocks_10_1_a", "lora_unet_conv_in", "lora_unet_output_blocks_2_1_a",
             "lora_unet_input_blocks_4_1_a", "lora_unet_middle_block_1_a", "lora_unet_output_blocks_2_1_b"]  # fmt: skip
    groups = group_by_block([{"name": n} for n in names])
    assert [b for b, _ in groups] == ["lora_unet_input_blocks_4", "lora_unet_middle_block_1",
                                      "lora_unet_output_blocks_2", "lora_unet_output_blocks_10",
                                      "lora_unet (other)"]  # fmt: skip
    assert [m["name"] for m in groups[2][1]] == ["lora_unet_output_blocks_2_1_a", "lora_unet_output_blocks_2_1_b"]


# ---------------------------------------------------------------------------------------------
# The markup alone


def test_page_is_self_contained_and_escaped(real: dict[str, Any]) -> None:
    doc = real["doc"]
    html = render_lora(doc)
    assert "<script" not in html  # the LoRA page ships no script; the names in it are text
    assert html_escape(HOSTILE_FILE) in html and "window.__pwned=3&lt;/script&gt;" in html
    assert "unknown_extra_key" not in html and "ignored" not in html
    lib = render_library(library_doc(real))
    assert lib.count("<script") == 1 and lib.count("</script>") == 1  # ours, at the end
    assert lib.rindex("<script>") > lib.rindex("</table>")
    assert html_escape(HOSTILE_PATH.removeprefix("/loras/")) in lib
    # Nothing to fetch: no URL, no src/href, no url(), no xmlns (inline SVG in HTML needs none).
    plain = {**doc, "lora": {**doc["lora"], "path": "/loras/plain.safetensors", "folder": "/loras"}}
    lib_plain = library_doc(real)
    for x in lib_plain["loras"]:
        x["path"] = x["path"].rsplit("/", 1)[0] + f"/lora{x['id']}.safetensors"
    for page in (render_lora(plain), render_library(lib_plain)):
        assert URLISH.search(page) is None, URLISH.search(page)
        assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_undecodable_file_names_and_optional_hashes(real: dict[str, Any]) -> None:
    doc = dict(real["doc"])
    doc["lora"] = dict(doc["lora"], path="/loras/caf\udce9.safetensors")  # os.fsdecode of b"caf\xe9"
    doc["variants"] = [dict(v, blake3="af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
                       for v in doc["variants"]]  # fmt: skip
    doc["variants"][1].update(rank_rule="multiple of 16", serve="lorax", servers=["lorax", "<vllm>"])
    html = render_lora(doc)
    html.encode("utf-8")  # writable as UTF-8
    assert "caf\\xe9.safetensors" in html
    assert "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262" in html
    assert "<th>Rank rule</th>" in html and "multiple of 16 serve lorax" in html and "lorax, &lt;vllm&gt;" in html


def test_a_lora_with_no_reduced_variant(real: dict[str, Any]) -> None:
    doc = {"generated_at": "2026-11-02T12:00:00+00:00",
           "lora": {"id": 3, "path": str(real["src"]), "folder": "/loras", "policy": None},
           "variants": [variant(1, real["src"], "original", True)], "modules": [], "shown_variant_id": None,
           "spectra": []}  # fmt: skip
    html = render_lora(doc)
    assert "No reduced variant yet" in html and "The active variant is the original" in html
    assert civitai_hashes(real["src"])["sha256"] in html


def test_write_html_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    write_html(target, "<!DOCTYPE html><p>new é</p>")
    assert target.read_text(encoding="utf-8") == "<!DOCTYPE html><p>new é</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left
    with pytest.raises(UnicodeEncodeError):
        write_html(target, "\ud800 not writable")  # fails before anything is written
    assert target.read_text(encoding="utf-8") == "<!DOCTYPE html><p>new é</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def html_escape(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# ---------------------------------------------------------------------------------------------
# In the browser


def open_page(driver: Any, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def box(driver: Any, element: Any) -> dict[str, float]:
    return driver.execute_script("var r = arguments[0].getBoundingClientRect();"
                                 "return {x: r.x, y: r.y, width: r.width, height: r.height};", element)  # fmt: skip


def assert_nothing_fetched_or_run(driver: Any, scripts: int) -> None:
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert driver.execute_script("return document.scripts.length") == scripts
    assert driver.execute_script("return document.images.length") == 0
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert console_errors(driver) == []


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


def assert_screenshot(driver: Any, path: Path) -> None:
    png = full_page_screenshot(driver, path)
    width, height = png_size(path.read_bytes())
    assert png == path.read_bytes() and width >= 800 and height >= 600
    from PIL import Image

    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text and charts, not a blank page


def test_lora_report_in_chromium(real: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    doc, fro, rank1 = real["doc"], real["fro"], real["rank1"]
    page = write_html(tmp_path / "lora report.html", render_lora(doc))
    open_page(browser, page)
    assert_screenshot(browser, tmp_path / "lora.png")
    browser.set_window_size(1280, 900)
    assert_nothing_fetched_or_run(browser, scripts=0)

    # Every chart is drawn: a non-empty box, and bars of non-zero size inside.
    charts = browser.find_elements("css selector", "svg.chart")
    kinds = browser.execute_script("return Array.from(document.querySelectorAll('svg.chart')).map(s => s.classList[1])")
    assert sorted(set(kinds)) == ["blocks", "modules", "sizes", "spectrum"]
    assert kinds.count("modules") == 5 and kinds.count("spectrum") == len(doc["spectra"]) == 6
    for chart in charts:
        b = box(browser, chart)
        assert b["width"] > 100 and b["height"] > 20, b
        assert browser.execute_script("return arguments[0].querySelectorAll('rect').length", chart) > 0

    # The page says who it is about, as text (the hostile names are not markup).
    assert browser.find_element("id", "lora-name").text == HOSTILE_FILE
    assert browser.find_element("id", "lora-path").text == str(real["src"])
    text = browser.execute_script("return document.body.textContent")
    assert "<script>window.__pwned=3</script>" in text

    # Sizes before and after, the saving, the whole file's retained Frobenius.
    src_bytes, out_bytes = real["src"].stat().st_size, real["fro_out"].stat().st_size
    assert browser.find_element("id", "card-original").text.split("\n")[1] == human_bytes(src_bytes)
    assert browser.find_element("id", "card-active").text.split("\n")[1] == human_bytes(out_bytes)
    assert browser.find_element("id", "card-saved").text.split("\n")[1] == f"{1 - out_bytes / src_bytes:.1%}"
    assert f"{fro.fro_retained_file:.4f}" in browser.find_element("id", "card-fro").text
    assert f"{fro.fro_retained_min:.4f}" in browser.find_element("id", "card-fro").text
    sizes = browser.find_element("css selector", "svg.sizes").get_attribute("textContent")
    for n in (src_bytes, out_bytes, real["rank_out"].stat().st_size):
        assert human_bytes(n) in sizes

    # The policy's decisions and why: the active variant passed, the rank-1 one was refused.
    passed, refused = browser.find_element("id", "decision-2").text, browser.find_element("id", "decision-3").text
    assert passed.startswith("activated") and doc["variants"][1]["decision"]["reason"] in passed
    assert refused.startswith("not activated") and "min_fro_retained" in refused
    assert doc["variants"][2]["decision"]["reason"] in refused
    assert f"{rank1.fro_retained_file:.4f}" in refused

    # Hashes of the original and of the active variant.
    for ident, path in (("hashes-original", real["src"]), ("hashes-active", real["fro_out"])):
        shown = browser.find_element("id", ident).text
        h = civitai_hashes(path)
        assert h["sha256"] in shown and h["autov2"] in shown and h["autov3"] in shown

    # Per module: rank in -> out and retained Frobenius, in its block's chart, bars in proportion.
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('g.mod')).map(g => {"
        "  var b = g.querySelector('rect.b-in').getBoundingClientRect(),"
        "      o = g.querySelector('rect.b-out').getBoundingClientRect(),"
        "      k = g.querySelector('rect.b-keep').getBoundingClientRect(),"
        "      l = g.querySelector('rect.b-lost').getBoundingClientRect();"
        "  return {name: g.dataset.name, text: g.textContent, block: g.closest('details').dataset.block,"
        "          win: b.width, wout: o.width, keep: k.width, track: l.width}; })")  # fmt: skip
    assert sorted(r["name"] for r in rows) == sorted(m.name for m in fro.modules)
    by_name = {m.name: m for m in fro.modules}
    rmax = max(m.rank_in for m in fro.modules)
    widest = max(r["win"] for r in rows)
    for r in rows:
        m = by_name[r["name"]]
        assert r["block"] == block_of(m.name)
        assert f"{m.rank_in} → {m.rank_out}" in r["text"] and f"{m.fro_retained:.4f}" in r["text"]
        assert r["win"] == pytest.approx(widest * m.rank_in / rmax, abs=0.6)
        assert r["wout"] == pytest.approx(r["win"] * m.rank_out / m.rank_in, abs=0.6)
        assert r["keep"] == pytest.approx(r["track"] * m.fro_retained, abs=0.6)
    blocks = browser.execute_script("return Array.from(document.querySelectorAll('g.blk')).map(g => g.dataset.block)")
    assert blocks == ["lora_te1_text_model_encoder_layers_0", "lora_te2_text_model_encoder_layers_1",
                      "lora_unet_input_blocks_4", "lora_unet_middle_block_1", "lora_unet_output_blocks_5"]  # fmt: skip

    # The spectra: kept bars up to the cut, and the retained ratio the values give (the engine's).
    for s in doc["spectra"]:
        info = browser.execute_script(
            "var d = Array.from(document.querySelectorAll('div.spec-card')).find(e => e.dataset.name === arguments[0]);"
            "var cut = d.querySelector('line.cut').getBoundingClientRect();"
            "var kept = Array.from(d.querySelectorAll('rect.b-out')).map(r => r.getBoundingClientRect());"
            "var bars = Array.from(d.querySelectorAll('rect.b-out, rect.b-in')).map(r => r.getBoundingClientRect());"
            "return {text: d.textContent, kept: kept.length, dropped: d.querySelectorAll('rect.b-in').length,"
            "        right: kept.length ? Math.max(...kept.map(r => r.right)) : null, cut: cut.x,"
            "        heights: bars.map(r => r.height), lefts: bars.map(r => r.x)};", s["name"])  # fmt: skip
        values, cut = s["values"], s["cut"]
        assert (info["kept"], info["dropped"]) == (cut, len(values) - cut)
        assert info["lefts"] == sorted(info["lefts"]) and info["heights"][0] > 50  # in index order, drawn
        assert all(a >= b - 0.6 for a, b in zip(info["heights"], info["heights"][1:]))  # descending values
        assert info["cut"] == pytest.approx(info["right"], abs=1.5)
        retained = math.sqrt(sum(v * v for v in values[:cut]) / sum(v * v for v in values))
        assert retained == pytest.approx(by_name[s["name"]].fro_retained, abs=1e-4)
        assert f"keeps {cut} of {len(values)} directions, retains {retained:.4f}" in info["text"]
        assert f"cut: {cut} of {len(values)} kept" in info["text"]


def library_doc(real: dict[str, Any]) -> dict[str, Any]:
    src, fro_out, rank_out = real["src"], real["fro_out"], real["rank_out"]
    a, b = "/srv/loras/sdxl", "/srv/loras/flux"
    size = lambda p: p.stat().st_size  # noqa: E731
    loras = [
        {"id": 1, "path": f"{a}/{src.name}", "folder": a, "active_kind": "reduced", "method": "fro", "param": 0.9,
         "bytes_original": size(src), "bytes_active": size(fro_out), "fro_retained_file": real["fro"].fro_retained_file,
         "refused": None},
        {"id": 2, "path": f"{a}/style.safetensors", "folder": a, "active_kind": "reduced", "method": "rank", "param": 1.0,
         "bytes_original": size(src), "bytes_active": size(rank_out), "fro_retained_file": real["rank1"].fro_retained_file,
         "refused": None},
        {"id": 10, "path": f"{b}/kept-as-is.safetensors", "folder": b, "active_kind": "original", "method": None,
         "param": None, "bytes_original": size(fro_out), "bytes_active": size(fro_out), "fro_retained_file": None,
         "refused": None},
        {"id": 3, "path": f"{b}/{HOSTILE_PATH.removeprefix('/loras/')}", "folder": b, "active_kind": "original",
         "method": None, "param": None, "bytes_original": size(rank_out), "bytes_active": size(rank_out),
         "fro_retained_file": None, "refused": "not a regular file (a FIFO)", "extra": 1},
    ]  # fmt: skip
    folders = []
    for f in (a, b):
        mine = [x for x in loras if x["folder"] == f]
        folders.append({"path": f, "loras": len(mine), "bytes_original": sum(x["bytes_original"] for x in mine),
                        "bytes_active": sum(x["bytes_active"] for x in mine)})  # fmt: skip
    return {"generated_at": "2026-11-02T12:00:00+00:00", "folders": folders, "loras": loras}


def test_library_report_in_chromium(real: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    doc = library_doc(real)
    page = write_html(tmp_path / "library.html", render_library(doc))
    open_page(browser, page)
    assert_screenshot(browser, tmp_path / "library.png")
    browser.set_window_size(1280, 900)
    assert_nothing_fetched_or_run(browser, scripts=1)

    # Space saved per folder: bars in proportion to the bytes.
    chart = browser.find_element("css selector", "svg.folders")
    assert box(browser, chart)["width"] > 100 and box(browser, chart)["height"] > 20
    bars = browser.execute_script(
        "return Array.from(document.querySelectorAll('g.folder')).map(g => ({path: g.dataset.path, text: g.textContent,"
        " o: g.querySelector('rect.b-in').getBoundingClientRect().width,"
        " a: g.querySelector('rect.b-out').getBoundingClientRect().width}))")  # fmt: skip
    widest = max(x["o"] for x in bars)
    biggest = max(f["bytes_original"] for f in doc["folders"])
    for f, bar in zip(doc["folders"], bars):
        assert bar["path"] == f["path"]
        assert bar["o"] == pytest.approx(widest * f["bytes_original"] / biggest, abs=0.6)
        assert bar["a"] == pytest.approx(widest * f["bytes_active"] / biggest, abs=0.6)
        saved = f["bytes_original"] - f["bytes_active"]
        assert f"saved {human_bytes(saved)} ({saved / f['bytes_original']:.1%}) · {f['loras']} LoRA" in bar["text"]

    total_o = sum(x["bytes_original"] for x in doc["loras"])
    total_a = sum(x["bytes_active"] for x in doc["loras"])
    assert browser.find_element("id", "card-saved").text.split("\n")[1] == human_bytes(total_o - total_a)

    # The table: one row per LoRA with its numbers, hostile names as text.
    def rows() -> list[list[str]]:
        return browser.execute_script("return Array.from(document.querySelectorAll('#lora-table tbody tr'))"
                                      ".map(r => Array.from(r.cells).map(c => c.textContent))")  # fmt: skip

    by_id = {r[0]: r for r in rows()}
    assert sorted(by_id) == sorted(str(x["id"]) for x in doc["loras"])
    for x in doc["loras"]:
        r = by_id[str(x["id"])]
        assert r[1] == x["path"][len(x["folder"]) + 1 :] and r[2] == x["folder"]
        assert r[4] == human_bytes(x["bytes_original"]) and r[5] == human_bytes(x["bytes_active"])
        assert r[6] == human_bytes(x["bytes_original"] - x["bytes_active"])
        assert r[8] == ("-" if x["fro_retained_file"] is None else f"{x['fro_retained_file']:.4f}")
    assert by_id["1"][3] == "fro 0.9" and by_id["2"][3] == "rank 1" and by_id["10"][3] == "original"
    assert by_id["3"][9] == "refused: not a regular file (a FIFO)"

    # Sorting without a server: click a header, the rows reorder; again, they reverse.
    def click(header: str) -> None:
        th = next(t for t in browser.find_elements("css selector", "#lora-table th") if t.text == header)
        th.click()

    def saved(x: dict[str, Any]) -> int:
        return x["bytes_original"] - x["bytes_active"]

    click("SAVED")  # the header is upper-cased by CSS
    assert [r[0] for r in rows()] == [str(x["id"]) for x in sorted(doc["loras"], key=lambda x: (saved(x), x["path"]))]
    click("SAVED")
    assert [r[0] for r in rows()] == [str(x["id"]) for x in sorted(doc["loras"], key=lambda x: (-saved(x), x["path"]))]
    click("ID")
    assert [r[0] for r in rows()] == ["1", "2", "3", "10"]  # numerically, not "1", "10", "2"
    click("FRO RETAINED (FILE)")  # LoRAs without a value go last
    fros = [r[8] for r in rows()]
    assert fros == sorted(fros[:2]) + ["-", "-"] and fros[0] < fros[1]
    click("FRO RETAINED (FILE)")
    assert [r[8] for r in rows()] == [fros[1], fros[0], "-", "-"]

    # The filter hides rows that do not match.
    box_ = browser.find_element("css selector", "input.filter")
    box_.send_keys("flux")
    visible = browser.execute_script("return Array.from(document.querySelectorAll('#lora-table tbody tr'))"
                                     ".filter(r => !r.hidden).map(r => r.cells[0].textContent)")  # fmt: skip
    assert sorted(visible) == ["10", "3"]
    assert console_errors(browser) == []


# ---------------------------------------------------------------------------------------------
# The README's screenshot


def make_docs_screenshot(out: Path) -> None:  # pragma: no cover - run by hand
    import subprocess
    import tempfile

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "loras" / "watercolor_style_v2.safetensors"
        src.parent.mkdir()
        subprocess.run([sys.executable, str(repo / "benchmarks" / "make_sdxl_lora.py"), str(src), "--limit", "60"],
                       check=True, cwd=repo)  # fmt: skip
        out_fro = Path(tmp) / "fro.safetensors"
        report = reduce_file(src, out_fro, ReduceSettings(method="fro", param=0.9, device="cpu"))
        doc = lora_doc(src, [(out_fro, report, True)], policy=Policy(name="default", method="fro", param=0.9))
        doc["lora"] = dict(doc["lora"], id=12, path=f"/home/ana/ComfyUI/models/loras/{src.name}",
                           folder="/home/ana/ComfyUI/models/loras")  # fmt: skip
        page = write_html(Path(tmp) / "report.html", render_lora(doc))
        with chromium(width=1180, height=900) as driver:
            open_page(driver, page)
            # From the top to the first blocks' module charts (the page goes on block by block).
            end = driver.execute_script("return document.getElementById('blocks').getBoundingClientRect().top")
            full_page_screenshot(driver, Path(tmp) / "full.png", max_height=int(end) + 330)
        with Image.open(Path(tmp) / "full.png") as img:
            img.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":  # pragma: no cover
    make_docs_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/report.png"))
