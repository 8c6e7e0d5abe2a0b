"""`lorad report` end to end: the real daemon reduces real files dropped into its folder, the real
`lorad report` process asks it for the document, renders the page and writes it; Debian's headless
Chromium (tests/_browser.py, network off) opens the file and must draw every chart and show the
numbers the JSON document holds, which are checked against the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from blake3 import blake3
from safetensors.torch import save_file

from lorad.sizes import human_bytes
from tests._browser import chromium, console_errors
from tests._daemon_fixtures import cli, cli_json, lorad_env, make_lora, wait_for


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def report(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `lorad report` in its own process, run from `cwd` (where it writes by default)."""
    return subprocess.run([sys.executable, "-m", "lorad", "report", "--config", str(config), *args],
                          capture_output=True, text=True, env=lorad_env(), cwd=str(cwd), timeout=120)  # fmt: skip


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_page(driver: Any, page: Path) -> None:
    driver.get(page.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # fetched nothing
    assert console_errors(driver) == []


def chart_boxes(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => {"
        " var r = s.getBoundingClientRect();"
        " return {kind: s.classList[1], width: r.width, height: r.height, bars: s.querySelectorAll('rect').length}; })")


def text_of(driver: Any, ident: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", ident)


def test_lorad_report_of_a_lora_and_of_the_library(rig, browser):
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    a = make_lora(loras / "a.safetensors", seed=1)
    b = make_lora(loras / "sub" / "b.safetensors", seed=2, dim=48)
    originals = {p: (sha_of(p), p.stat().st_size) for p in (a, b)}
    daemon.start()
    pipe = loras / "pipe.safetensors"
    os.mkfifo(pipe)  # refused: the library page lists it with why

    def settled() -> dict[str, Any] | None:
        listed = {x["path"]: x for x in cli_json(config, "list")}
        done = all(str(p) in listed and listed[str(p)]["active_bytes"] != listed[str(p)]["original_bytes"] for p in (a, b))
        return listed if done and str(pipe) in listed else None

    wait_for(settled, 90, 0.2, "both LoRAs reduced and the FIFO refused")
    # A second reduction under the "tiny" policy (rank 1, min_fro_retained 0.99): refused by the policy.
    cli(config, "enqueue", str(a), "--policy", "tiny")
    wait_for(lambda: len(cli_json(config, "show", str(a))["variants"]) == 3
             and all(j["state"] == "done" for j in cli_json(config, "show", str(a))["jobs"]), 90, 0.2, "the tiny job")  # fmt: skip

    # -- one LoRA, written under its default name in the current directory, atomically ----------
    out = tmp / "out"
    out.mkdir()
    page = out / "a.report.html"
    page.write_text("an older report")
    old = open(page, encoding="utf-8")  # a reader that had the old page open keeps reading it whole
    old_inode = page.stat().st_ino
    run = report(config, out, str(a), "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["path"] == str(page)
    assert old.read() == "an older report" and page.stat().st_ino != old_inode  # renamed over, not rewritten
    old.close()
    assert sorted(p.name for p in out.iterdir()) == ["a.report.html"]  # no temp file left

    doc = result["doc"]
    assert doc["lora"]["path"] == str(a) and doc["lora"]["policy"] == "default"
    variants = {v["kind"] + ("-active" if v["active"] else ""): v for v in doc["variants"]}
    assert sorted(variants) == ["original", "reduced", "reduced-active"]
    orig, active, refused = variants["original"], variants["reduced-active"], variants["reduced"]
    assert (orig["sha256"], orig["bytes"]) == originals[a]
    assert active["sha256"] == sha_of(a) and active["bytes"] == a.stat().st_size  # the file at the path
    assert active["blake3"] == blake3(a.read_bytes()).hexdigest()
    assert (active["autov2"], active["param"], refused["param"]) == (active["sha256"][:10], 2, 1)
    # Rank 8 everywhere meets vLLM (8), LoRAX (8) and hotswap; rank 2 only hotswap's one-rank rule.
    assert orig["servers"] == ["vllm", "lorax", "diffusers-hotswap"] and active["servers"] == ["diffusers-hotswap"]
    assert active["decision"]["activate"] is True and refused["decision"]["activate"] is False
    assert "min_fro_retained" in refused["decision"]["reason"] and orig["decision"] is None
    assert 0.9 < active["fro_retained_file"] < 1 and refused["fro_retained_file"] < 0.99
    assert doc["shown_variant_id"] == active["id"]
    assert [(m["rank_in"], m["rank_out"]) for m in doc["modules"]] == [(8, 2)] * 3
    assert len(doc["spectra"]) == 3 and all(len(s["values"]) == 8 and s["cut"] == 2 for s in doc["spectra"])

    open_page(browser, page)
    charts = chart_boxes(browser)
    assert {c["kind"] for c in charts} == {"sizes", "blocks", "modules", "spectrum"}
    assert sum(c["kind"] == "spectrum" for c in charts) == 3
    assert all(c["width"] > 100 and c["height"] > 20 and c["bars"] > 0 for c in charts), charts
    assert browser.find_element("id", "lora-path").text == str(a)
    assert browser.find_element("id", "card-original").text.split("\n")[1] == human_bytes(orig["bytes"])
    assert browser.find_element("id", "card-active").text.split("\n")[1] == human_bytes(active["bytes"])
    assert browser.find_element("id", "card-saved").text.split("\n")[1] == f"{1 - active['bytes'] / orig['bytes']:.1%}"
    assert f"{active['fro_retained_file']:.4f}" in text_of(browser, "card-fro")
    for v in (active, refused):
        decided = text_of(browser, f"decision-{v['id']}")
        assert v["decision"]["reason"] in decided and f"{v['decision']['saving']:.1%}" in decided
    for ident, v in (("hashes-original", orig), ("hashes-active", active)):
        shown = text_of(browser, ident)
        assert all(v[k] in shown for k in ("sha256", "autov2", "autov3", "blake3")), ident
    spectra = text_of(browser, "spectra")
    assert spectra.count("keeps 2 of 8 directions") == 3
    assert all(s["name"] in spectra for s in doc["spectra"])
    assert refused["servers"] == ["vllm", "diffusers-hotswap"]  # rank 1 is one of vLLM's ranks
    rows_by_variant = dict(browser.execute_script(
        "return Array.from(document.querySelectorAll('#variants tbody tr')).map(r => [r.dataset.variant, r.textContent])"))
    for v in (orig, active, refused):
        assert ", ".join(v["servers"]) in rows_by_variant[str(v["id"])]

    # -- the library, to the file named with -o ------------------------------------------------
    run = report(config, out, "--all", "-o", "library.html", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["path"] == str(out / "library.html")
    lib = result["doc"]
    (folder,) = lib["folders"]
    assert folder == {"path": str(loras), "loras": 2, "bytes_original": originals[a][1] + originals[b][1],
                      "bytes_active": a.stat().st_size + b.stat().st_size}  # fmt: skip
    rows = {x["path"]: x for x in lib["loras"]}
    assert sorted(rows) == sorted([str(a), str(b), str(pipe)])
    assert rows[str(pipe)]["id"] is None and "FIFO" in rows[str(pipe)]["refused"]
    for p in (a, b):
        assert (rows[str(p)]["bytes_original"], rows[str(p)]["bytes_active"]) == (originals[p][1], p.stat().st_size)
        assert rows[str(p)]["active_kind"] == "reduced" and rows[str(p)]["param"] == 2

    open_page(browser, out / "library.html")
    charts = chart_boxes(browser)
    assert [c["kind"] for c in charts] == ["folders"] and charts[0]["width"] > 100 and charts[0]["height"] > 20
    assert browser.find_element("id", "card-original").text.split("\n")[1] == human_bytes(folder["bytes_original"])
    assert browser.find_element("id", "card-active").text.split("\n")[1] == human_bytes(folder["bytes_active"])
    table = browser.execute_script("return Array.from(document.querySelectorAll('#lora-table tbody tr'))"
                                   ".map(r => [r.dataset.path, Array.from(r.cells).map(c => c.textContent)])")  # fmt: skip
    cells = dict((path, row) for path, row in table)
    assert sorted(cells) == sorted(rows)
    for p in (a, b):
        x, row = rows[str(p)], cells[str(p)]
        assert row[0] == str(x["id"]) and row[1] == str(p.relative_to(loras)) and row[3] == "rank 2"
        assert (row[4], row[5]) == (human_bytes(x["bytes_original"]), human_bytes(x["bytes_active"]))
        assert row[8] == f"{x['fro_retained_file']:.4f}"
    assert cells[str(pipe)][9] == f"refused: {rows[str(pipe)]['refused']}"

    # -- what cannot be reported --------------------------------------------------------------
    missing = report(config, out, "99999")
    assert missing.returncode == 2 and "no LoRA with id 99999" in missing.stderr
    neither = report(config, out)
    assert neither.returncode == 2 and "give a LoRA" in neither.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.report.html", "library.html"]


def uneven_lora(path: Path, rank: int = 8, dim: int = 32) -> Path:
    """A kohya LoRA (scale 1) with one strong module of rank 2 and two weak ones with a flat
    spectrum: at rank 2 the strong one keeps all of its norm and the weak ones half of theirs, so
    the module mean (0.667) is far from the whole file's energy-weighted ratio (0.996)."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for i, (size, true_rank) in enumerate([(30.0, 2), (1.0, rank), (1.0, rank)]):
        qb, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen))
        qa, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen))
        s = torch.zeros(rank)
        s[:true_rank] = size
        name = f"lora_unet_mid_block_attentions_0_proj_{i}"
        tensors[f"{name}.lora_up.weight"] = (qb * s).contiguous()
        tensors[f"{name}.lora_down.weight"] = qa.T.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return path


def test_one_file_level_figure_in_list_show_decision_and_report(rig, browser):
    tmp, daemon = rig
    config = daemon.config
    path = uneven_lora(tmp / "loras" / "uneven.safetensors")
    daemon.start()
    listed = wait_for(lambda: next((x for x in cli_json(config, "list") if x["path"] == str(path)
                                    and x["active_variant"] != x["original_variant"]), None),
                      90, 0.2, "the LoRA reduced")  # fmt: skip
    [variant] = [v for v in listed["variants"] if v["active"]]
    figure = variant["fro_retained_file"]
    expected = ((2 * 900 + 2 * 2) / (2 * 900 + 2 * 8)) ** 0.5  # energies kept / energies, per module
    assert figure == pytest.approx(expected, abs=1e-4)
    assert variant["fro_retained_mean"] == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-4)
    assert variant["fro_retained_min"] == pytest.approx(0.5, abs=1e-4)

    shown = cli_json(config, "show", str(path))
    assert next(v for v in shown["variants"] if v["active"])["fro_retained_file"] == figure
    [decided] = [e for e in shown["events"] if e["kind"] == "decided"]
    assert decided["variant"] == variant["id"] and decided["detail"]["fro_retained_file"] == figure
    assert f"keeps {figure:.4f} of the file's Frobenius norm" in decided["detail"]["reason"]
    table = cli(config, "show", str(path)).stdout
    assert "FRO_RETAINED_FILE" in table and f"{figure:.4f}" in table
    assert f"{variant['fro_retained_mean']:.4f}" not in table

    out = tmp / "out"
    out.mkdir()
    run = report(config, out, str(path), "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)["doc"]
    [documented] = [v for v in doc["variants"] if v["active"]]
    assert documented["fro_retained_file"] == figure and documented["decision"]["fro_retained_file"] == figure
    open_page(browser, out / "uneven.report.html")
    card = text_of(browser, "card-fro")
    assert f"{figure:.4f}" in card and f"module min {variant['fro_retained_min']:.4f}" in card
    assert f"keeps {figure:.4f} of the file's Frobenius norm" in text_of(browser, f"decision-{variant['id']}")
    row = browser.execute_script("return Array.from(document.querySelector('#variants tr[data-variant=\"' + arguments[0]"
                                 " + '\"]').cells).map(c => c.textContent)", str(variant["id"]))  # fmt: skip
    assert row[6] == f"{figure:.4f}" and row[7] == f"{variant['fro_retained_min']:.4f}"

    run = report(config, out, "--all", "-o", "library.html", "--json")
    assert run.returncode == 0, run.stderr
    [entry] = [x for x in json.loads(run.stdout)["doc"]["loras"] if x["path"] == str(path)]
    assert entry["fro_retained_file"] == figure
