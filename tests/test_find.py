"""`find`: from any identity a user or a library manager has for a LoRA (sha256 or a prefix,
AutoV2, AutoV3, sshs_model_hash, BLAKE3, a sidecar's claim) back to the LoRA, the variant with
those bytes and the variant at the path now. Real files, the real engine, a real SQLite file, and
for the end-to-end case the real daemon driven by real `lorad` processes.

Every expected hash is computed here from the bytes on disk (hashlib, the blake3 package), never
taken from lorad's own records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from safetensors.torch import load_file, save_file
from sqlalchemy import text
from structlog.testing import capture_logs

from lorad.library.hashes import HashQueryError
from lorad.library.library import Library
from lorad.library.sidecars import MAX_SIDECAR_BYTES
from tests._daemon_fixtures import cli, cli_json, show_if_known, wait_for
from tests._daemon_fixtures import make_lora as make_daemon_lora
from tests._store_fixtures import civitai_hashes, make_lora, reduce_with_engine, sha256_of


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


@pytest.fixture
def lib(tmp_path: Path, root: Path) -> Iterator[Library]:
    library = Library(tmp_path / "state", [root], link_mode="copy")
    yield library
    library.close()


def identities(path: Path) -> dict[str, str]:
    """What a user may have for the file at `path`, from its bytes alone."""
    h = civitai_hashes(path)
    return {**h, "blake3": blake3(path.read_bytes()).hexdigest()}


def kohya_lora(path: Path, seed: int = 0) -> Path:
    """A kohya LoRA whose metadata carries sshs_model_hash as kohya writes it: the sha256 of its
    data section (which the header does not change, so it can name itself)."""
    make_lora(path, seed=seed)
    data = civitai_hashes(path)["addnet"]
    save_file(load_file(str(path)), str(path), metadata={"ss_network_dim": "8", "sshs_model_hash": data})
    assert civitai_hashes(path)["addnet"] == data
    return path


def found(lib: Library, query: str) -> list[tuple[int, int | None, bool, set[str]]]:
    """(lora id, variant id, is that variant active, kinds of hash that matched) per match."""
    result = lib.find_hash(query)
    return [(m.lora.id, m.variant_id, m.variant_id == m.lora.active_variant_id, {h.kind for h in m.hits})
            for m in result.matches]  # fmt: skip


def reduce(lib: Library, path: Path, rank: int, work: Path) -> Any:
    original = lib.lora(path).original
    assert original is not None
    work.mkdir(exist_ok=True)
    report = reduce_with_engine(lib.store.path_of(original.blob_sha256), work / f"r{rank}.safetensors", rank)
    return lib.add_variant(path, report, actor="worker")


def assert_found_by_every_kind(lib: Library, ids: dict[str, str], lora: int, variant: int, active: bool) -> None:
    sshs = ids["addnet"]  # kohya's sshs_model_hash is the data section's sha256, in full
    cases = [
        (ids["sha256"], {"sha256"}),
        (ids["sha256"][:8], {"sha256"}),
        (ids["autov2"], {"autov2"}),
        (ids["autov2"].upper(), {"autov2"}),  # as Civitai prints it
        (ids["autov3"], {"autov3", "sshs_model_hash"}),  # an honest sshs_model_hash begins with it too
        (ids["blake3"], {"blake3"}),
        ("blake3:" + ids["blake3"], {"blake3"}),  # as InvokeAI stores it
        (sshs, {"addnet", "sshs_model_hash"}),
    ]
    for query, kinds in cases:
        assert found(lib, query) == [(lora, variant, active, kinds)], query


# -- the library API -------------------------------------------------------------------------------


def test_every_hash_kind_leads_to_the_lora_after_ingest_reduction_and_revert(tmp_path, root, lib):
    path = kohya_lora(root / "style.safetensors")
    original_ids = identities(path)
    view = lib.ingest(path, actor="daemon")
    original = view.original_variant_id
    assert original is not None
    assert_found_by_every_kind(lib, original_ids, view.id, original, active=True)

    reduced = reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, reduced.id, actor="daemon")
    reduced_ids = identities(path)  # the watched path holds the reduction now
    assert reduced_ids["sha256"] == reduced.blob_sha256 != original_ids["sha256"]
    assert_found_by_every_kind(lib, reduced_ids, view.id, reduced.id, active=True)
    assert_found_by_every_kind(lib, original_ids, view.id, original, active=False)  # the original's identities stay

    lib.revert(path, actor="cli:uid=1000")
    assert sha256_of(path) == original_ids["sha256"]
    assert_found_by_every_kind(lib, original_ids, view.id, original, active=True)
    assert_found_by_every_kind(lib, reduced_ids, view.id, reduced.id, active=False)
    assert [x.id for x in lib.find(reduced_ids["autov3"])] == [view.id]


def test_an_ambiguous_prefix_returns_every_match(tmp_path, root, lib):
    a = kohya_lora(root / "a.safetensors", seed=1)
    copy = root / "sub" / "a-copy.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(a, copy)  # the same bytes at two paths: two LoRAs, one blob
    b = kohya_lora(root / "b.safetensors", seed=2)
    sha = sha256_of(a)
    # A sidecar beside b claims a hash that shares a's first 8 hex digits and no more.
    other = sha[:8] + ("0" if sha[8] != "0" else "1") + sha[9:]
    (root / "b.metadata.json").write_text(json.dumps({"sha256": other, "file_name": "b"}))
    ids = {p: lib.ingest(p).id for p in (a, copy, b)}

    matches = lib.find_hash(sha[:8]).matches
    assert [(m.lora.id, m.variant_id is not None, [(h.kind, h.value, h.source) for h in m.hits]) for m in matches] == [
        (ids[a], True, [("sha256", sha, None)]),
        (ids[copy], True, [("sha256", sha, None)]),
        (ids[b], False, [("sha256", other, "b.metadata.json")]),
    ]
    assert [m.lora.id for m in lib.find_hash(sha).matches] == [ids[a], ids[copy]]  # the full hash: the bytes only


def test_sidecar_claims_are_recorded_searchable_and_never_touched(tmp_path, root, lib):
    path = kohya_lora(root / "style.safetensors")
    ids = identities(path)
    # The file as Civitai has it was pruned by the user before lorad saw it: Civitai Helper's and
    # Stability Matrix's sidecars name the download, ComfyUI-Lora-Manager's the file on disk.
    download = {"SHA256": "A1" * 32, "AutoV1": "0A1B2C3D", "AutoV2": "A1A1A1A1A1", "AutoV3": "B2" * 6,
                "BLAKE3": "C3" * 32, "CRC32": "D4E5F607"}  # fmt: skip
    training_zip = {"SHA256": "E5" * 32, "AutoV2": "E5E5E5E5E5"}
    sidecars = {
        root / "style.civitai.info": json.dumps({
            "id": 101, "modelId": 7, "name": "v1",
            "files": [{"name": "style_training.zip", "type": "Training Data", "primary": False, "hashes": training_zip},
                      {"name": "style.safetensors", "type": "Model", "primary": True, "hashes": download}],
        }).encode(),  # fmt: skip
        root / "style.cm-info.json": json.dumps({"ModelId": 7, "ModelName": "style", "VersionId": 101,
                                                 "Hashes": {"SHA256": download["SHA256"], "BLAKE3": download["BLAKE3"],
                                                            "CRC32": download["CRC32"]}}).encode(),  # fmt: skip
        root / "style.metadata.json": json.dumps({"file_name": "style", "model_name": "Style", "sha256": ids["sha256"],
                                                  "civitai": {"id": 101, "files": [{"primary": True, "hashes": download}]}}).encode(),  # fmt: skip
        root / "style.preview.png": b"\x89PNG\r\n\x1a\n....",
    }
    for sidecar, data in sidecars.items():
        sidecar.write_bytes(data)
    before = {p: (sha256_of(p), p.stat().st_mtime_ns) for p in sidecars}

    view = lib.ingest(path)
    original = view.original_variant_id
    claims = {(k, v, src) for k, v, src in lib.db.engine.connect().execute(
        text("SELECT kind, value, source FROM claimed_hashes"))}  # fmt: skip
    want = {(k.lower(), v.lower(), src) for src in ("style.civitai.info", "style.metadata.json")
            for k, v in download.items()}  # fmt: skip
    want |= {(k.lower(), download[k].lower(), "style.cm-info.json") for k in ("SHA256", "BLAKE3", "CRC32")}
    want |= {("sha256", ids["sha256"], "style.metadata.json")}
    assert claims == want  # the training zip's hashes are not this file's: not recorded

    # A claimed hash of bytes lorad never held leads to the LoRA, with no variant.
    for query, kind in ((download["SHA256"], "sha256"), (download["AutoV2"], "autov2"), (download["CRC32"], "crc32"),
                        ("blake3:" + download["BLAKE3"], "blake3"), (download["AutoV1"], "autov1")):  # fmt: skip
        (match,) = lib.find_hash(query).matches
        assert (match.lora.id, match.variant_id) == (view.id, None), query
        assert {(h.kind, h.claimed) for h in match.hits} == {(kind, True)}, query
    assert lib.find_hash(training_zip["SHA256"]).matches == ()
    # ComfyUI-Lora-Manager's sha256 is the original's: its claim resolves to that variant.
    (match,) = lib.find_hash(ids["sha256"]).matches
    assert match.variant_id == original
    assert {(h.kind, h.source) for h in match.hits} == {("sha256", None), ("sha256", "style.metadata.json")}

    reduced = reduce(lib, path, 4, tmp_path / "work")
    lib.activate(path, reduced.id)
    (match,) = lib.find_hash(download["CRC32"]).matches  # the claims outlive the replacement
    assert match.lora.active_variant_id == reduced.id
    lib.revert(path)
    lib.ingest(path)  # a known file: the claims are re-read, none is added twice
    lib.verify()
    assert len(list(lib.db.engine.connect().execute(text("SELECT id FROM claimed_hashes")))) == len(want)
    assert {p: (sha256_of(p), p.stat().st_mtime_ns) for p in sidecars} == before


def test_a_sidecar_written_after_ingest_is_read_at_verify(tmp_path, root, lib):
    path = kohya_lora(root / "late.safetensors")
    view = lib.ingest(path)
    claimed = "5e" * 32
    assert lib.find_hash(claimed).matches == ()
    (root / "late.cm-info.json").write_text(json.dumps({"Hashes": {"SHA256": claimed.upper()}}))
    lib.verify()
    assert [(m.lora.id, m.variant_id) for m in lib.find_hash(claimed).matches] == [(view.id, None)]


def test_a_sidecar_whose_name_is_not_utf8_is_recorded_by_a_printable_name(root, lib):
    raw = os.fsencode(root) + b"/caf\xe9"  # Latin-1, as an old archive unpacks it
    path = Path(os.fsdecode(raw + b".safetensors"))
    kohya_lora(root / "tmp.safetensors").rename(path)
    claimed = "7f" * 32
    with open(raw + b".cm-info.json", "wb") as f:
        f.write(json.dumps({"Hashes": {"SHA256": claimed}}).encode())
    view = lib.ingest(path)
    (match,) = lib.find_hash(claimed).matches
    assert match.lora.id == view.id and [h.source for h in match.hits] == ["caf\\xe9.cm-info.json"]


def test_unreadable_sidecars_are_skipped_with_a_log_line(tmp_path, root, lib):
    path = kohya_lora(root / "x.safetensors")
    bad_json = root / "x.civitai.info"
    bad_json.write_bytes(b'{"files": [{"hashes": {"SHA256": "ab')  # cut short by a crashed download
    fifo = root / "x.metadata.json"
    os.mkfifo(fifo)  # would block a plain open() for good
    huge = root / "x.cm-info.json"
    with open(huge, "wb") as f:
        f.truncate(MAX_SIDECAR_BYTES + 1)
    result: dict[str, Any] = {}

    def ingest() -> None:
        with capture_logs() as logs:
            result["view"] = lib.ingest(path)
        result["logs"] = logs

    worker = threading.Thread(target=ingest, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "ingest blocked on a sidecar"
    assert result["view"].original is not None
    reasons = {(e["event"], Path(str(e["path"])).name) for e in result["logs"] if e["event"].startswith("sidecar ignored")}
    assert reasons == {("sidecar ignored: not JSON", "x.civitai.info"),
                       ("sidecar ignored: cannot read it", "x.metadata.json"),
                       ("sidecar ignored: too large", "x.cm-info.json")}  # fmt: skip
    assert list(lib.db.engine.connect().execute(text("SELECT id FROM claimed_hashes"))) == []
    assert bad_json.read_bytes() == b'{"files": [{"hashes": {"SHA256": "ab'


def test_blake3_of_blobs_stored_before_lorad_computed_it_is_filled_in_by_verify(root, lib):
    path = kohya_lora(root / "old.safetensors")
    ids = identities(path)
    lib.ingest(path)
    with lib.db.engine.begin() as conn:  # as a database migrated from 0003 has it
        conn.execute(text("UPDATE blobs SET blake3 = NULL"))
    result = lib.find_hash(ids["blake3"])
    assert (result.matches, result.blake3_pending) == ((), 1)
    lib.verify()
    result = lib.find_hash(ids["blake3"])
    assert [m.lora.path for m in result.matches] == [path.resolve()] and result.blake3_pending == 0


@pytest.mark.parametrize("query", ["", "abc1234", "not-hex-at-all", "g" * 10, "0" * 65, "md5:" + "a" * 32])
def test_text_that_names_no_hash_is_refused(lib, query):
    with pytest.raises(HashQueryError):
        lib.find_hash(query)


# -- end to end: the daemon and the `lorad find` command ----------------------------------------


def test_lorad_find_end_to_end(rig):
    tmp, daemon = rig
    config, loras = daemon.config, tmp / "loras"
    path = make_daemon_lora(loras / "hero.safetensors", seed=4)
    original = identities(path)
    info = loras / "hero.civitai.info"
    info.write_text(json.dumps({"id": 9, "files": [{"name": "hero.safetensors", "primary": True, "hashes": {
        "SHA256": original["sha256"].upper(), "AutoV2": original["autov2"].upper(), "CRC32": "89ABCDEF"}}]}))
    info_sha = sha256_of(info)
    daemon.start()

    def reduced() -> dict[str, Any] | None:
        shown = show_if_known(config, str(path))
        return shown if shown and any(v["active"] and v["kind"] == "reduced" for v in shown["variants"]) else None

    shown = wait_for(reduced, 90, 0.2, "the reduction to be activated")
    now = identities(path)
    reduced_id = shown["active_variant"]

    # People: the LoRA, the variant that has the hash, the active one.
    out = cli(config, "find", original["autov2"].upper()).stdout
    assert out.splitlines()[:3] == [
        f"{path}  (LoRA {shown['id']})",
        f"  variant #{shown['original_variant']} original: AutoV2 {original['sha256']}; "
        f"AutoV2 {original['sha256']} (claimed by hero.civitai.info); "
        f"AutoV2 {original['autov2']} (claimed by hero.civitai.info)",
        f"  active: #{reduced_id} rank2",
    ]

    # Scripts: the JSON, for the reduced file's BLAKE3 and a hash only the sidecar knows.
    (m,) = cli_json(config, "find", now["blake3"])["matches"]
    assert (m["lora"]["path"], m["variant"]["id"], m["variant"]["sha256"], m["active"]) == (
        str(path), reduced_id, now["sha256"], True)  # fmt: skip
    assert m["hits"] == [{"kind": "blake3", "value": now["blake3"], "claimed": False, "source": None}]
    (m,) = cli_json(config, "find", "89abcdef")["matches"]
    assert m["variant"] is None and m["hits"][0]["source"] == "hero.civitai.info"

    cli(config, "revert", str(path))
    (m,) = cli_json(config, "find", now["sha256"][:8])["matches"]
    assert (m["variant"]["id"], m["active"], m["lora"]["active_variant"]) == (reduced_id, False, shown["original_variant"])
    (m,) = cli_json(config, "find", original["autov3"])["matches"]
    assert (m["variant"]["id"], m["active"]) == (shown["original_variant"], True)

    missing = cli(config, "find", "0000dead", check=False)
    assert missing.returncode == 1 and "no LoRA has a hash beginning 0000dead" in missing.stdout
    short = cli(config, "find", "abc", "--json", check=False)
    assert short.returncode == 2 and json.loads(short.stdout)["error"]["code"] == "bad_params"
    assert "at least 8 hex digits" in short.stderr
    assert sha256_of(info) == info_sha
    assert hashlib.sha256(path.read_bytes()).hexdigest() == original["sha256"]
