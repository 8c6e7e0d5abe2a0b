"""`lorad list` against the real daemon (a subprocess) and its real library of files: the filters
(--folder, --policy, --state), every sort order, --limit, and the pages the socket answers in."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.control.client import Client
from lorad.daemon.control.protocol import LIST_SORTS, LIST_STATES, Code, ControlError
from lorad.cli.control import render_list
from lorad.library import listing
from tests._daemon_fixtures import Daemon, cli, cli_json, make_lora, wait_for, write_config

KEPT_WATCH = "  - path: {folder}\n    policy: tiny\n"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemon]]:
    """A running daemon whose records hold LoRAs in every state, under two folders and policies:
    in loras/ (policy default, which reduces and activates) three reduced LoRAs of different sizes
    and a pickle it refused; in kept/ (policy tiny, whose reductions keep too little to be
    activated) two LoRAs whose paths hold their originals."""
    tmp = tmp_path_factory.mktemp("list")
    config = write_config(tmp, watch_extra=KEPT_WATCH.format(folder=tmp / "kept"))
    daemon = Daemon(config, tmp / "daemon.log").start()
    loras, kept = tmp / "loras", tmp / "kept"
    reduced = [make_lora(loras / f"{name}.safetensors", seed=i, dim=dim)
               for i, (name, dim) in enumerate([("b-mid", 48), ("a-small", 32), ("c-large", 64)])]  # fmt: skip
    originals = [make_lora(kept / "sub" / "d.safetensors", seed=7, dim=40), make_lora(kept / "e.safetensors", seed=8)]
    (loras / "0-pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)

    def everything_done() -> list[dict[str, Any]] | None:
        listed = cli_json(config, "list")
        states = {x["path"]: x["state"] for x in listed}
        done = cli_json(config, "status")["queue"]["done"]
        want = {**{str(p): "reduced" for p in reduced}, **{str(p): "original" for p in originals},
                str(loras / "0-pickled.safetensors"): "refused"}  # fmt: skip
        return listed if states == want and done == len(reduced) + len(originals) else None

    wait_for(everything_done, 120, 0.2, "every file reduced, kept or refused")
    yield tmp, daemon
    daemon.stop(signal.SIGTERM)


def paths(entries: list[dict[str, Any]]) -> list[str]:
    return [x["path"] for x in entries]


def listed(daemon: Daemon, *args: str) -> list[dict[str, Any]]:
    return cli_json(daemon.config, "list", *args)


def test_filters(library: tuple[Path, Daemon]) -> None:
    tmp, daemon = library
    everything = listed(daemon)
    assert len(everything) == 6 and len(set(paths(everything))) == 6
    by_state = {state: {x["path"] for x in everything if x["state"] == state} for state in LIST_STATES}
    for state in LIST_STATES:
        assert set(paths(listed(daemon, "--state", state))) == by_state[state]
    assert by_state["refused"] == {str(tmp / "loras" / "0-pickled.safetensors")}
    assert all(x["id"] is None for x in listed(daemon, "--state", "refused"))
    # "original" and "reduced" say what the path holds: the active variant's kind.
    for state in ("original", "reduced"):
        assert {next(v["kind"] for v in x["variants"] if v["active"]) for x in listed(daemon, "--state", state)} == {state}

    # A refused path has the policy of the folder it lies in.
    assert set(paths(listed(daemon, "--policy", "tiny"))) == by_state["original"]
    assert set(paths(listed(daemon, "--policy", "default"))) == by_state["reduced"] | by_state["refused"]
    assert listed(daemon, "--policy", "nonesuch") == []

    kept = tmp / "kept"
    assert set(paths(listed(daemon, "--folder", str(kept)))) == by_state["original"]
    assert paths(listed(daemon, str(kept / "sub"))) == [str(kept / "sub" / "d.safetensors")]
    both = listed(daemon, "--folder", str(tmp / "loras"), "--state", "reduced", "--policy", "default")
    assert set(paths(both)) == by_state["reduced"]
    outside = cli(daemon.config, "list", "--folder", str(tmp), "--json", check=False)
    assert outside.returncode == 2 and '"outside_watch"' in outside.stdout


def _added(x: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(next(v["created_at"] for v in x["variants"] if v["kind"] == "original"))


def test_every_sort_order(library: tuple[Path, Daemon]) -> None:
    _, daemon = library
    everything = listed(daemon)
    loras = [x for x in everything if x["id"] is not None]
    refused = [x for x in everything if x["id"] is None]  # refused paths follow the LoRAs in every order
    assert paths(everything) == sorted(paths(loras)) + sorted(paths(refused)) == paths(listed(daemon, "--sort", "name"))
    assert len({x["active_bytes"] for x in everything if x["id"] is not None}) == 5  # sizes tell them apart

    def figure_first(figure: str) -> list[str]:
        known = [x for x in everything if x[figure] is not None]
        unknown = [x for x in everything if x[figure] is None]  # the refused path: last
        return paths(sorted(known, key=lambda x: (-x[figure], x["path"]))) + paths(unknown)

    for x in everything:
        x["saved"] = None if x["id"] is None else x["original_bytes"] - x["active_bytes"]
    size_order = paths(listed(daemon, "--sort", "size"))
    assert size_order == figure_first("active_bytes")
    assert paths(listed(daemon, "--sort", "saved")) == figure_first("saved")
    assert size_order[-1] == str(library[0] / "loras" / "0-pickled.safetensors")
    assert paths(listed(daemon, "--sort", "date")) == paths(sorted(loras, key=_added, reverse=True)) + paths(refused)
    assert set(LIST_SORTS) == set(listing.SORTS)  # the protocol offers what the library sorts by

    # --limit: the first N of the order, and the table says how many there are.
    assert paths(listed(daemon, "--sort", "size", "--limit", "2")) == size_order[:2]
    table = cli(daemon.config, "list", "--sort", "saved", "--limit", "1").stdout
    assert "(1 of 6 shown" in table and figure_first("saved")[0] in table


def test_pages_hold_every_lora_once_even_as_the_library_changes(library: tuple[Path, Daemon]) -> None:
    tmp, daemon = library
    sock = tmp / "run" / "lorad.sock"
    shown = listed(daemon)
    everything = paths(shown)
    loras, refused = paths([x for x in shown if x["id"] is not None]), paths([x for x in shown if x["id"] is None])
    with Client(sock) as client:
        for sort in LIST_SORTS:
            seen, after = [], None
            while True:
                page = client.call("list", sort=sort, limit=2, after=after)
                assert len(page["loras"]) <= 2 and page["total"] == (len(everything) if after is None else None)
                seen += paths(page["loras"])
                after = page["next"]
                if after is None:
                    break
            assert sorted(seen) == sorted(everything) and len(seen) == len(everything), sort

        # A place in the order, not a position: LoRAs added between pages shift nothing.
        first = client.call("list", sort="name", limit=3)
        assert paths(first["loras"]) == loras[:3]
        before, after = tmp / "loras" / "0-first.safetensors", tmp / "loras" / "z-last.safetensors"
        make_lora(before, seed=20)
        make_lora(after, seed=21)
        wait_for(lambda: {str(before), str(after)} <= {x["path"] for x in listed(daemon, "--state", "reduced")},
                 90, 0.2, "the new LoRAs reduced")  # fmt: skip
        rest = client.call("list", sort="name", after=first["next"])
        assert rest["next"] is None
        # Refused paths follow the LoRAs in every order.
        assert paths(first["loras"]) + paths(rest["loras"]) == loras + [str(after)] + refused

        for bad in ('["size", "loras", 1, 2, "x"]', "not json", '["name", "loras", 5]', '["name", "elsewhere", "x"]'):
            with pytest.raises(ControlError) as error:
                client.call("list", sort="name", after=bad)
            assert error.value.code == Code.BAD_PARAMS
        for params in ({"state": "gone"}, {"sort": "colour"}, {"limit": 0}):
            with pytest.raises(ControlError) as error:
                client.call("list", **params)
            assert error.value.code == Code.BAD_PARAMS, params


def test_list_reads_no_file(library: tuple[Path, Daemon]) -> None:
    """With the store's blobs out of reach, `list` shows everything it showed, ranks and the
    servers they meet included: it answered from the records alone."""
    tmp, daemon = library
    before = listed(daemon)
    objects = tmp / "state" / "store" / "objects"
    os.rename(objects, objects.with_name("objects-away"))
    try:
        assert listed(daemon) == before
    finally:
        os.rename(objects.with_name("objects-away"), objects)
    assert all(v["ranks"] is not None and v["servers"] is not None for x in before for v in x["variants"])


def test_the_table_shows_what_the_full_listing_says(library: tuple[Path, Daemon]) -> None:
    """The table reads brief pages (each LoRA's sizes, active variant and count of variants, from
    the page's own query); they say what the full listing's variants say, page by page."""
    tmp, daemon = library
    for args in ([], ["--state", "reduced"], ["--sort", "saved"], ["--folder", str(tmp / "kept")]):
        full = listed(daemon, *args)
        assert cli(daemon.config, "list", *args).stdout == render_list(full, len(full)) + "\n", args
    with Client(tmp / "run" / "lorad.sock") as client:
        after, seen = None, 0
        while True:
            brief = client.call("list", brief=True, limit=2, after=after)
            whole = client.call("list", limit=2, after=after)
            assert paths(brief["loras"]) == paths(whole["loras"]) and brief["next"] == whole["next"]
            for b, w in zip(brief["loras"], whole["loras"], strict=True):
                if w["id"] is None:  # a refused path lorad holds no LoRA for: the same entry
                    assert b == w
                    continue
                active = next((v for v in w["variants"] if v["active"]), None)
                assert b["active"] == (None if active is None else {k: active[k] for k in b["active"]})
                assert (b["id"], b["kind"], b["state"], b["original_bytes"], b["active_bytes"], b["refused"]) == \
                       (w["id"], w["kind"], w["state"], w["original_bytes"], w["active_bytes"], w["refused"])
                assert b["variant_count"] == len(w["variants"])
            seen += len(brief["loras"])
            after = brief["next"]
            if after is None:
                break
    assert seen == len(listed(daemon)) >= 6
