"""Crash safety for adapter folders: a child process running a library operation on a PEFT folder
is SIGKILLed at each named step (LORAD_TEST_CRASH_AT), with renameat2(RENAME_EXCHANGE) and with
the two-rename fallback. Afterwards the watched folder (in mirror mode: its mirror, the watched
folder byte for byte untouched) holds the old tree or the new one, whole (or, in the fallback's one
unbound instant, no folder, which the next reconcile puts back); the stored trees are intact;
`verify` brings the records to the disk; the request asked again works; gc keeps every file a kept
tree names."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from lorad._atomic import NO_EXCHANGE_ENV
from lorad.engine.report import Report
from lorad.errors import StoreError
from lorad.library import trees
from lorad.library.library import Library
from tests._folder_fixtures import make_adapter, peft_deltas, tree_of
from tests._store_fixtures import event_kinds, reduce_with_engine, run_child, table

BEFORE_SWAP = ["put:before-materialize", "folder:after-temp-write", "folder:after-fsync"]
AFTER_EXCHANGE = ["folder:after-exchange", "folder:after-dir-fsync", "folder:after-retire", "put:after-commit"]
AFTER_RENAMES = ["folder:after-rename", "folder:after-dir-fsync", "folder:after-retire", "put:after-commit"]
UNBOUND = "folder:after-aside"  # the fallback's instant between its two renames


@dataclass
class World:
    state: Path
    root: Path
    path: Path
    original: int
    r4: int
    r2: int
    trees: dict[int, dict[str, str]]  # variant id -> the folder's files (name -> sha256)
    tree_sha: dict[int, str]
    mirror_root: Path | None = None  # mirror mode: where the active variant's folder is

    def open(self) -> Library:
        return Library(self.state, [self.root], link_mode="copy", mirrors=self.mirrors)

    @property
    def mirrors(self) -> dict[Path, Path] | None:
        return {self.root: self.mirror_root} if self.mirror_root else None

    @property
    def shown(self) -> Path:
        """The folder that holds the active variant."""
        return self.mirror_root / self.path.relative_to(self.root) if self.mirror_root else self.path


@pytest.fixture(scope="module")
def reductions(tmp_path_factory) -> dict[int, Report]:
    """The engine's rank-4 and rank-2 reductions of the folder every case starts from (made once)."""
    work = tmp_path_factory.mktemp("reductions")
    src = make_adapter(work / "chat")
    return {rank: reduce_with_engine(src, work / f"r{rank}", rank) for rank in (4, 2)}


def _world(tmp_path: Path, active: str, reductions: dict[int, Report], mirrored: bool = False) -> World:
    root = tmp_path / "adapters"
    path = make_adapter(root / "chat")
    mirror_root = tmp_path / "mirror" if mirrored else None
    with Library(tmp_path / "state", [root], link_mode="copy", mirrors={root: mirror_root} if mirror_root else None) as lib:
        ids = {"original": lib.ingest(path).original.id}
        found = {"original": tree_of(path)}
        for rank, report in reductions.items():
            ids[f"r{rank}"] = lib.add_variant(path, report).id
            found[f"r{rank}"] = tree_of(Path(report.output.path))
        if active != "original":
            lib.activate(path, ids[active])
        shas = {v.id: v.blob_sha256 for v in lib.lora(path).variants}
    files = {ids[k]: found[k] for k in ids}
    return World(tmp_path / "state", root, path, ids["original"], ids["r4"], ids["r2"], files, shas, mirror_root)


def assert_folders_consistent(lib: Library) -> None:
    """Every folder LoRA's folder (in mirror mode: its mirror, the watched folder holding the
    original) holds its active tree; every stored blob and tree is intact; nothing of an
    interrupted swap is left beside it or in the swap area."""
    variants = {v["id"]: v for v in table(lib, "variants")}
    for blob in table(lib, "blobs"):
        assert lib.store.is_intact(blob["sha256"])
        if blob["kind"] == "tree":
            entries = trees.decode(lib.store.read_blob(blob["sha256"]))
            assert all(lib.store.is_intact(e.sha256) for e in entries)
    for lora in table(lib, "loras"):
        path = Path(lora["path"])
        mirror = lib.mirrors.get(Path(lora["folder"]))
        if mirror is not None:
            assert trees.hash_folder(path)[0] == variants[lora["original_variant_id"]]["blob_sha256"], path
            path = mirror / path.relative_to(lora["folder"])
        assert trees.hash_folder(path)[0] == variants[lora["active_variant_id"]]["blob_sha256"], path
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert list(lib.swap_area.iterdir()) == []


PUTS = {
    "activate": ("original", lambda w: ["activate", str(w.r4)], lambda w: w.r4),
    "revert": ("r4", lambda w: ["revert"], lambda w: w.original),
    "switch": ("r4", lambda w: ["switch", str(w.r2)], lambda w: w.r2),
}
CASES = [(point, False) for point in BEFORE_SWAP + AFTER_EXCHANGE] + [
    (point, True) for point in BEFORE_SWAP + [UNBOUND] + AFTER_RENAMES
]


@pytest.mark.parametrize(("point", "fallback"), CASES, ids=[f"{p}{'-renames' if f else ''}" for p, f in CASES])
@pytest.mark.parametrize("op", list(PUTS))
@pytest.mark.parametrize("mode", ["replace", "mirror"])
def test_killed_during_a_folder_put_leaves_a_whole_folder(tmp_path, reductions, monkeypatch, mode, op, point, fallback):
    if fallback:
        monkeypatch.setenv(NO_EXCHANGE_ENV, "1")
    initially, args, final = PUTS[op]
    w = _world(tmp_path, initially, reductions, mirrored=mode == "mirror")
    watched = tree_of(w.path)
    old = {"original": w.original, "r4": w.r4}[initially]
    new = final(w)
    mirror = [f"--mirror={w.mirror_root}"] if w.mirror_root else []
    done = run_child([args(w)[0], str(w.state), str(w.root), str(w.path), *args(w)[1:], *mirror], crash_at=point)
    assert done.returncode == -signal.SIGKILL, f"{point} never reached: {done.stdout}{done.stderr}"

    swapped = point not in BEFORE_SWAP and point != UNBOUND
    if point == UNBOUND:
        assert not os.path.lexists(w.shown)  # no folder for an instant, never a mix of two
    else:
        assert tree_of(w.shown) == w.trees[new if swapped else old]
    with w.open() as lib:
        committed = point == "put:after-commit"
        last = {"activate": "activated", "revert": "reverted", "switch": "switched"}[op]
        assert (event_kinds(lib)[-1] == last) == committed
        report = lib.verify(stale_after=timedelta(0))  # puts an unbound folder back
        assert report.ok and report.corrupt == () and report.stray == (), report
        reconciled = [(r.from_variant, r.to_variant, r.new_original) for r in report.reconciled]
        assert reconciled == ([(old, new, False)] if swapped and not committed else [])
        assert tree_of(w.shown) == w.trees[new if swapped else old]
        assert lib.lora(w.path).active_variant_id == (new if swapped else old)
        assert_folders_consistent(lib)
        # The interrupted request, asked again, completes.
        getattr(lib, op)(w.path, *([new] if op != "revert" else []))
        assert tree_of(w.shown) == w.trees[new] and lib.lora(w.path).active_variant_id == new
        assert_folders_consistent(lib)
    if w.mirror_root:
        assert tree_of(w.path) == watched  # the watched folder: never written


@pytest.mark.parametrize("point", ["ingest:after-store", "ingest:after-commit"])
def test_killed_during_a_folder_ingest_stores_all_or_nothing(tmp_path, point):
    root = tmp_path / "adapters"
    path = make_adapter(root / "chat")
    before = tree_of(path)
    Library(tmp_path / "state", [root]).close()
    done = run_child(["ingest", str(tmp_path / "state"), str(root), str(path)], crash_at=point)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert tree_of(path) == before
    with Library(tmp_path / "state", [root]) as lib:
        assert [row["kind"] for row in table(lib, "loras")] == (["folder"] if point == "ingest:after-commit" else [])
        assert lib.verify(stale_after=timedelta(0)).ok
        view = lib.ingest(path)  # the daemon's next scan
        assert view.kind == "folder" and len(view.variants) == 1
        assert_folders_consistent(lib)


def test_a_folder_edited_outside_lorad_becomes_an_original_and_is_not_replaced(tmp_path, reductions):
    """A user's edit that lorad has not seen: the activation refuses, the edited tree is stored as
    a new original first, and the folder is left as the user made it."""
    w = _world(tmp_path, "original", reductions)
    config = w.path / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', '"r":8'))
    edited = tree_of(w.path)
    with w.open() as lib:
        with pytest.raises(StoreError, match="changed outside lorad; kept it as a new original"):
            lib.activate(w.path, w.r4)
        assert tree_of(w.path) == edited
        view = lib.lora(w.path)
        assert view.original_variant_id not in w.trees and view.active_variant_id == view.original_variant_id
        lib.switch(w.path, w.r4)
        lib.revert(w.path)
        assert tree_of(w.path) == edited  # the user's edit, back byte for byte
        assert_folders_consistent(lib)


def test_gc_keeps_every_file_a_kept_tree_names_and_revert_still_works(tmp_path, reductions):
    w = _world(tmp_path, "r4", reductions)
    with w.open() as lib:
        lib.switch(w.path, w.r2)
        lib.gc(dry_run=False, keep_variants=1, grace=timedelta(0))
        kept = {v.id for v in lib.lora(w.path).variants}
        assert kept == {w.original, w.r2}  # r4 went; its files that other trees share stayed
        assert lib.verify(stale_after=timedelta(0)).ok
        assert_folders_consistent(lib)
        lib.revert(w.path)
        assert tree_of(w.path) == w.trees[w.original]
        reduced = peft_deltas(w.path)
        lib.switch(w.path, w.r2)
        after = peft_deltas(w.path)
        assert max(float((after[n] - reduced[n]).abs().max()) for n in reduced) < 1e-4  # rank 2 is exact here


def test_the_library_says_which_folders_it_holds_unchanged(tmp_path, reductions):
    """What lets the watcher skip its open_lora check on a rescan or restart: only a folder lorad
    stored, with the stamp lorad last recorded (after its own swaps too), counts as held."""
    w = _world(tmp_path, "r4", reductions)
    other = make_adapter(w.root / "other", seed=9)
    with w.open() as lib:
        assert lib.holds_folder(w.path)  # activated by lorad: its own swap's stamp
        assert not lib.holds_folder(other)  # never ingested
        config = w.path / "adapter_config.json"
        config.write_text(config.read_text() + " ")
        assert not lib.holds_folder(w.path)  # changed since: looked at in full again
