"""Crash safety: a child process running a library operation is SIGKILLed at each named step
(LORAD_TEST_CRASH_AT). Afterwards the watched file is a complete safetensors file holding the old
or the new variant, the original blob is intact, and `verify` brings the records to the disk."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from lorad.engine.formats.safetensors_file import is_complete
from lorad.engine.report import Report
from lorad.library.library import Library
from tests._store_fixtures import (
    assert_consistent,
    event_kinds,
    make_lora,
    reduce_with_engine,
    run_child,
    sha256_of,
    table,
)

BEFORE_RENAME = ["put:before-materialize", "materialize:after-temp-write", "materialize:after-fsync"]
AFTER_RENAME = ["materialize:after-rename", "materialize:after-dir-fsync", "put:after-commit"]
PUT_POINTS = BEFORE_RENAME + AFTER_RENAME


@dataclass
class World:
    state: Path
    root: Path
    path: Path
    original: int
    r4: int
    r2: int
    sha: dict[int, str]  # variant id -> blob sha256

    def open(self) -> Library:
        return Library(self.state, [self.root], link_mode="copy")


@pytest.fixture(scope="module")
def reductions(tmp_path_factory) -> dict[int, Report]:
    """The engine's rank-4 and rank-2 reductions of the LoRA every case starts from (made once)."""
    work = tmp_path_factory.mktemp("reductions")
    src = make_lora(work / "style.safetensors")
    return {rank: reduce_with_engine(src, work / f"r{rank}.safetensors", rank) for rank in (4, 2)}


def _world(tmp_path: Path, active: str, reductions: dict[int, Report]) -> World:
    root = tmp_path / "loras"
    path = make_lora(root / "style.safetensors")
    with Library(tmp_path / "state", [root], link_mode="copy") as lib:
        original = lib.ingest(path).original
        ids = {"original": original.id}
        for rank, report in reductions.items():
            ids[f"r{rank}"] = lib.add_variant(path, report).id
        if active != "original":
            lib.activate(path, ids[active])
        sha = {v.id: v.blob_sha256 for v in lib.lora(path).variants}
    return World(tmp_path / "state", root, path, ids["original"], ids["r4"], ids["r2"], sha)


# op: (initially active, child arguments, variant expected at the end)
PUTS = {
    "activate": ("original", lambda w: ["activate", str(w.r4)], lambda w: w.r4),
    "revert": ("r4", lambda w: ["revert"], lambda w: w.original),
    "switch": ("r4", lambda w: ["switch", str(w.r2)], lambda w: w.r2),
}


def _child(w: World, args: list[str], point: str):
    op, *rest = args
    done = run_child([op, str(w.state), str(w.root), str(w.path), *rest], crash_at=point)
    assert done.returncode == -signal.SIGKILL, f"{point} never reached: {done.stdout}{done.stderr}"
    return done


@pytest.mark.parametrize("point", PUT_POINTS)
@pytest.mark.parametrize("op", list(PUTS))
def test_killed_during_a_put_leaves_old_or_new_and_verify_agrees(tmp_path, reductions, op, point):
    initially, args, final = PUTS[op]
    w = _world(tmp_path, initially, reductions)
    old = {"original": w.original, "r4": w.r4}[initially]
    new = final(w)
    _child(w, args(w), point)

    assert is_complete(w.path)
    expected = old if point in BEFORE_RENAME else new
    assert sha256_of(w.path) == w.sha[expected]
    with w.open() as lib:
        assert lib.store.is_intact(w.sha[w.original])
        committed = point == "put:after-commit"
        assert (event_kinds(lib)[-1] == {"activate": "activated", "revert": "reverted",
                                         "switch": "switched"}[op]) == committed  # fmt: skip
        report = lib.verify(stale_after=timedelta(0))
        assert report.ok and report.corrupt == () and report.stray == ()
        reconciled = [(r.from_variant, r.to_variant, r.new_original) for r in report.reconciled]
        renamed_not_recorded = point in AFTER_RENAME and not committed
        assert reconciled == ([(old, new, False)] if renamed_not_recorded else [])
        assert lib.lora(w.path).active_variant_id == expected
        assert lib.store.temp_files() == []
        assert_consistent(lib)
        # The interrupted request, asked again, completes.
        getattr(lib, op)(w.path, *([new] if op != "revert" else []))
        assert sha256_of(w.path) == w.sha[new] and lib.lora(w.path).active_variant_id == new
        assert_consistent(lib)


@pytest.mark.parametrize("point", ["store:ingest:after-temp-write", "store:ingest:after-rename"])
def test_killed_while_taking_in_a_hand_edited_file_keeps_the_edit(tmp_path, reductions, point):
    w = _world(tmp_path, "r4", reductions)
    edited = make_lora(tmp_path / "edited.safetensors", seed=7).read_bytes()
    w.path.write_bytes(edited)
    _child(w, ["switch", str(w.r2)], point)

    assert w.path.read_bytes() == edited
    with w.open() as lib:
        report = lib.verify(stale_after=timedelta(0))
        assert [(r.from_variant, r.new_original) for r in report.reconciled] == [(w.r4, True)]
        view = lib.lora(w.path)
        assert view.active == view.original and view.original.blob_sha256 == sha256_of(w.path)
        assert lib.store.is_intact(w.sha[w.original]) and lib.store.temp_files() == []
        assert_consistent(lib)


@pytest.mark.parametrize(
    "point", ["store:ingest:after-temp-write", "store:ingest:after-rename", "ingest:after-store",
              "ingest:after-commit"]  # fmt: skip
)
def test_killed_during_ingest_stores_all_or_nothing(tmp_path, point):
    root = tmp_path / "loras"
    path = make_lora(root / "new.safetensors")
    before = path.read_bytes()
    Library(tmp_path / "state", [root]).close()  # migrated, so the child only runs the ingest
    _child(World(tmp_path / "state", root, path, 0, 0, 0, {}), ["ingest"], point)

    assert path.read_bytes() == before
    with Library(tmp_path / "state", [root]) as lib:
        for sha in lib.store.blobs():
            assert sha == sha256_of(path) and lib.store.is_intact(sha)  # complete, or absent
        recorded = [row["path"] for row in table(lib, "loras")]
        assert recorded == ([str(path.resolve())] if point == "ingest:after-commit" else [])
        report = lib.verify(stale_after=timedelta(0))
        assert report.ok and lib.store.temp_files() == []
        lib.ingest(path)  # the daemon's next scan
        assert_consistent(lib)


def test_killed_after_gc_commits_leaves_strays_the_next_gc_removes(tmp_path, reductions):
    w = _world(tmp_path, "r4", reductions)
    _child(w, ["gc"], "gc:after-commit")
    with w.open() as lib:
        assert {v.id for v in lib.lora(w.path).variants} == {w.original, w.r4}
        report = lib.verify(stale_after=timedelta(0))
        assert report.stray == (w.sha[w.r2],) and report.ok
        size = lib.store.path_of(w.sha[w.r2]).stat().st_size
        assert lib.gc(dry_run=False, grace=timedelta(0)).stray == ((w.sha[w.r2], size),)
        assert list(lib.store.blobs()) == sorted([w.sha[w.original], w.sha[w.r4]])
        assert_consistent(lib)
