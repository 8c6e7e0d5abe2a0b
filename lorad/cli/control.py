"""Client commands over the daemon's socket: status, list, show, find, revert, switch, enqueue,
pause, resume, drain, rescan, verify, gc. Each prints a table for people or, with --json, the reply as JSON.

The socket is found from `--socket PATH`, else the `socket` key of `--config FILE`, else
$LORAD_SOCKET, else the default path (this user's, then the system service's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorad.daemon.config import default_socket_candidates, load_config
from lorad.daemon.control.client import Client
from lorad.daemon.control.protocol import LIST_PAGE, LIST_SORTS, LIST_STATES, Code, ControlError
from lorad.errors import LoradError
from lorad.sizes import human_bytes

Render = Callable[[Any], str]


def socket_path(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None):
        return Path(args.socket)
    if getattr(args, "config", None):
        return load_config(args.config).socket
    if os.environ.get("LORAD_SOCKET"):
        return Path(os.environ["LORAD_SOCKET"])
    candidates = default_socket_candidates()
    return next((c for c in candidates if c.exists()), candidates[0])


def call(args: argparse.Namespace, method: str, **params: Any) -> Any:
    with Client(socket_path(args)) as client:
        return client.call(method, **params)


def emit(args: argparse.Namespace, result: Any, render: Render, dump: Render | None = None) -> int:
    text = (dump or _indented)(result) if args.json else render(result)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `lorad list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _indented(result: Any) -> str:
    return json.dumps(result, indent=2, default=str)


def _one_per_line(entries: list[Any]) -> str:
    """A JSON array with one compact entry per line: json's C encoder writes a list of 10,000
    LoRAs in a fifth of the time indent=2 takes (Python's encoder), and each stays one line."""
    return "[\n" + ",\n".join(json.dumps(x, default=str) for x in entries) + "\n]" if entries else "[]"


BUSY_EXIT = 75  # EX_TEMPFAIL: "try again later", unlike a refusal (2)


def _scriptable(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """With --json, an error reply is printed as JSON on stdout too (exit status 2, or BUSY_EXIT
    when the daemon had no room for us), so scripts can branch on its code; people get the
    one-line message on stderr either way."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ControlError as e:
            if args.json:
                print(json.dumps({"error": {"code": e.code, "message": e.message}}))
            if e.code == Code.BUSY:
                print("lorad: the daemon is busy (too many connections); try again", file=sys.stderr)
                return BUSY_EXIT
            raise ControlError(e.code, _printable(e.message)) from None

    return run


def _printable(text: str) -> str:
    """A file name's undecodable bytes (os.fsdecode's lone surrogates) as \\xHH, as `ls -b` shows
    them, rather than as \\udcHH; any other lone surrogate as its escape."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def absolute_path(path: str | Path) -> str:
    """Paths go to the daemon absolute: it does not share our working directory."""
    return os.path.abspath(os.path.expanduser(str(path)))


def target_of(text: str) -> int | str:
    """A LoRA's id, or its path made absolute (the daemon's form of a target). Only ASCII digits
    are an id: int() would take other scripts' digits too, and such a name is a file's."""
    return int(text) if text.isascii() and text.isdigit() else absolute_path(text)


# ---------------------------------------------------------------------------------------------
# Renderers (plain data -> text)


def render_status(s: dict[str, Any]) -> str:
    q = s["queue"]
    lines = [
        f"lorad {s['version']} (pid {s['pid']}), up {s['uptime_s']:.0f}s, device {s['device']}, "
        f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}"
        + (", DRAINING" if s.get("draining") else ", PAUSED" if s["paused"] else "")
        + ("" if s["in_window"] else ", outside the reduction window"),
        f"queue: {s['queue_depth']} waiting or running  (pending {q['pending']}, running {q['running']}, "
        f"done {q['done']}, failed {q['failed']})",
    ]  # fmt: skip
    for job in s["running"]:
        lines.append(f"running: job {job['job']} {job['path']} [{job['policy']}] "
                     f"{job['progress']:.0%} ({job['modules_done']}/{job['modules_total']} modules, {job['seconds']:.0f}s)")  # fmt: skip
    if not s["running"]:
        lines.append("running: nothing")
    if s.get("waiting"):
        lines.append(f"waiting: {s['waiting']}")
    if s.get("ingesting"):
        lines.append(f"ingesting: {s['ingesting']['done']:,} of {s['ingesting']['total']:,} files found by a scan")
    saved = s["saved_bytes"]
    share = f" ({saved / s['original_bytes']:.0%})" if s["original_bytes"] else ""
    lines.append(f"space: {s['loras']} LoRAs, originals {human_bytes(s['original_bytes'])}, "
                 f"now {human_bytes(s['active_bytes'])}, saved {human_bytes(saved)}{share}")  # fmt: skip
    if s.get("node"):
        lines.append(f"node: {s['node']}, store {s['store_dir']}" + (f" (id {s['store_id']})" if s.get("store_id") else ""))
    fleet = s.get("fleet") or {}
    watchers = {} if fleet.get("error") else {f["path"]: f["node"] for f in fleet.get("folders", [])}
    for w in s["watch"]:
        by = f", watched by {watchers[w['path']] or 'no node (lease free or expired)'}" if w["path"] in watchers else ""
        lines.append(f"watching: {w['path']} (policy {w['policy']}{by})")
    if fleet.get("nodes"):
        lines.append("nodes:")
        rows = [[n["name"] + (" (this)" if n.get("this") else ""), n["device"] or "-", f"{n['heartbeat_age_s']:.0f}s ago",
                 str(n["running_jobs"]), "yes" if n["draining"] else "no", "" if n["alive"] else "silent"]
                for n in fleet["nodes"]]  # fmt: skip
        lines += ["  " + line for line in table(rows, ["NODE", "DEVICE", "HEARTBEAT", "RUNNING", "DRAINING", ""]).splitlines()]
    if fleet.get("error"):
        lines.append(f"fleet: {fleet['error']}")
    db = s.get("database") or {}
    if db and not db.get("reachable", True):
        lines.append(f"database: UNREACHABLE since {db.get('since')}: {db.get('error')} (retrying; the figures "
                     f"above are as of {db.get('as_of') or 'never'})")  # fmt: skip
    if s.get("refused_files"):
        lines.append(f"refused: {s['refused_files']} file(s) not taken (`lorad list` says why)")
    return "\n".join(lines)


def _active(lora: dict[str, Any]) -> dict[str, Any] | None:
    if "variant_count" in lora:  # the brief form (`list` with brief): the active variant alone
        return lora["active"]
    return next((v for v in lora["variants"] if v["active"]), None)


def render_list(loras: list[dict[str, Any]], total: int | None = None) -> str:
    rows = []
    for x in loras:
        if x["id"] is None:
            continue  # a refused path: listed below
        active = _active(x)
        path = x["path"] + ("/" if x.get("kind") == "folder" else "")  # an adapter folder, as `ls -p`
        rows.append([
            str(x["id"]), path, human_bytes(x["original_bytes"]), human_bytes(x["active_bytes"]),
            _variant_label(active) if active else "-", _effect(active) if active else "",
            _servers(active) if active else "-", str(x["variant_count"] if "variant_count" in x else len(x["variants"])),
        ])  # fmt: skip
    header = ["ID", "PATH", "ORIGINAL", "NOW", "ACTIVE", "EFFECT", "SERVES", "VARIANTS"]
    if not any(row[5] for row in rows):  # no active variant measured: no empty column
        header, rows = _without(5, header, rows)
    lines = [table(rows, header) if rows else "no LoRAs recorded yet"]
    refused = [x for x in loras if x.get("refused")]
    if refused:
        lines += ["", "refused (fix the file, then `lorad rescan`):"]
        lines += [f"  {x['path']}: {x['refused']['cause']}: {x['refused']['reason']}" for x in refused]
    if total is not None and total > len(loras):
        lines += ["", f"({len(loras):,} of {total:,} shown; --limit sets how many)"]
    return "\n".join(lines)


def _variant_label(v: dict[str, Any]) -> str:
    if v["kind"] == "original":
        return f"#{v['id']} original"
    param = "" if v["param"] is None else f"{v['param']:g}"
    return f"#{v['id']} {v['method']}{param}"


def _effect(v: dict[str, Any]) -> str:
    """The variant's latest measured effect_retained (mean, worst sample); blank: not measured."""
    if v.get("effect_retained") is None:
        return ""
    return f"{v['effect_retained']:.3f} min {v['effect_retained_min']:.3f}"


def _servers(v: dict[str, Any]) -> str:
    """The serving hosts whose rank rules the variant meets as it is ("?": ranks unknown)."""
    servers = v.get("servers")
    if servers is None:
        return "?"
    return ",".join(servers) if servers else "-"


def _ranks(v: dict[str, Any]) -> str:
    span = v.get("ranks")
    if not span:
        return "?"
    return str(span["min"]) if span["uniform"] else f"{span['min']}-{span['max']}"


def render_variants(x: dict[str, Any]) -> str:
    rows = []
    for v in x["variants"]:
        fro = "-" if v["fro_retained_file"] is None else f"{v['fro_retained_file']:.4f}"
        rows.append(["*" if v["active"] else "", str(v["id"]), v["kind"], v["method"] or "-",
                     "-" if v["param"] is None else f"{v['param']:g}", human_bytes(v["bytes"]), fro,
                     _effect(v) or "-", _ranks(v), _servers(v)])  # fmt: skip
    header = ["", "VARIANT", "KIND", "METHOD", "PARAM", "SIZE", "FRO_RETAINED_FILE", "EFFECT", "RANKS", "SERVES"]
    if all(v.get("effect_retained") is None for v in x["variants"]):
        header, rows = _without(7, header, rows)
    return table(rows, header)


def _without(column: int, header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    return header[:column] + header[column + 1 :], [r[:column] + r[column + 1 :] for r in rows]


def render_effects(x: dict[str, Any]) -> list[str]:
    """Each effect measurement of the LoRA's variants (the latest first): the figures, the base
    model (path, short hash), the sample set and when."""
    lines = []
    latest: set[int] = set()
    for e in x.get("effects") or []:
        shown_first = e["variant"] not in latest
        latest.add(e["variant"])
        kl = "" if e.get("kl_mean") is None else f", KL {e['kl_mean']:.4g}"
        lines.append(
            f"variant {e['variant']}: effect retained {e['effect_retained']:.4f} (worst sample "
            f"{e['effect_retained_min']:.4f}{kl}) against variant {e.get('reference_variant') or '?'}, "
            f"{e['kind']} on base {e['base']} (sha256 {e['base_sha256'][:12]}), samples {e['samples_id']}, "
            f"measured {e['measured_at']}" + ("" if shown_first else " (earlier, another base or sample set)"))
    return lines


def render_show(x: dict[str, Any]) -> str:
    refused = x.get("refused")
    if x["id"] is None:
        return f"{x['path']}: refused since {refused['since']}: {refused['cause']}: {refused['reason']}"
    kind = ", adapter folder" if x.get("kind") == "folder" else ""
    lines = [f"{x['path']}  (id {x['id']}, policy {x['policy']}{kind})", "", render_variants(x)]
    if x.get("mirror"):
        lines[1:1] = [f"mirrored to {x['mirror']}: the active variant is there; the path keeps the original"]
    ruled = [v for v in x["variants"] if v.get("rank_rule") or v.get("serve")]
    if ruled:
        lines.append("")
        lines += [f"variant {v['id']}: made for {v.get('serve') or 'a rank rule'}: {v.get('rank_rule') or '-'}"
                  for v in ruled]  # fmt: skip
    measured = render_effects(x)
    if measured:
        lines += ["", *measured]
    if refused:
        lines += ["", f"its file is refused since {refused['since']}: {refused['cause']}: {refused['reason']}"]
    decisions = [e for e in x.get("events", []) if e["kind"] == "decided"]
    if decisions:
        lines.append("")
        for e in decisions:
            verdict = "activated" if e["detail"].get("activate") else "not activated"
            lines.append(f"variant {e['variant']}: {verdict}: {e['detail'].get('reason')}")
    failed = [j for j in x.get("jobs", []) if j["state"] == "failed"]
    for j in failed:
        lines.append(f"job {j['id']} [{j['policy']}] failed: {j['error']}")
    return "\n".join(lines)


_HASH_NAMES = {"sha256": "sha256", "autov1": "AutoV1", "autov2": "AutoV2", "autov3": "AutoV3", "addnet": "addnet",
               "blake3": "BLAKE3", "crc32": "CRC32", "sshs_model_hash": "sshs_model_hash",
               "sshs_legacy_hash": "sshs_legacy_hash"}  # fmt: skip


def _hit_label(h: dict[str, Any]) -> str:
    label = f"{_HASH_NAMES.get(h['kind'], h['kind'])} {h['value']}"
    return label + (f" (claimed by {h['source']})" if h["claimed"] else "")


def render_find(r: dict[str, Any]) -> str:
    pending = r.get("blake3_pending") or 0
    note = (f"({pending} stored file{'s have' if pending != 1 else ' has'} no BLAKE3 yet; "
            "`lorad verify` computes them)") if pending else ""  # fmt: skip
    if not r["matches"]:
        return f"no LoRA has a hash beginning {r['query']}" + (f"\n{note}" if note else "")
    lines = []
    for m in r["matches"]:
        lora, variant = m["lora"], m["variant"]
        active = _active(lora)
        hits = "; ".join(_hit_label(h) for h in m["hits"])
        lines.append(f"{lora['path']}  (LoRA {lora['id']})")
        if variant is not None:
            lines.append(f"  variant {_variant_label(variant)}{' (active)' if m['active'] else ''}: {hits}")
        else:
            lines.append(f"  {hits}: no stored variant has these bytes")
        lines.append(f"  active: {_variant_label(active) if active else '-'}")
    if note:
        lines.append(note)
    return "\n".join(lines)


def render_rescan(r: dict[str, Any]) -> str:
    retried = r.get("retried_jobs") or []
    return "rescan requested" + (f"; {len(retried)} failed job(s) queued again" if retried else "")


def render_switched(x: dict[str, Any]) -> str:
    active = _active(x)
    label = _variant_label(active) if active else "?"
    return f"{x['path']} now holds variant {label} ({human_bytes(x['active_bytes'])})"


def render_enqueued(r: dict[str, Any]) -> str:
    job = r["job"]
    verb = "queued" if r["created"] else f"already known ({job['state']})"
    return f"job {job['id']} for {r['lora']['path']} under policy {job['policy']}: {verb}"


def render_verify(r: dict[str, Any]) -> str:
    lines = [f"verify: {'ok' if r['ok'] else 'PROBLEMS FOUND'}; {r['blobs_checked']} blobs checked"]
    if r.get("store_identity"):
        lines.append(f"  store identity: {r['store_identity']}")
    for key in ("corrupt", "missing", "repaired", "stray", "missing_files", "unsettled", "temp_removed"):
        if r[key]:
            lines.append(f"  {key.replace('_', ' ')}: {len(r[key])}")
    for ref in r.get("refused", []):
        lines.append(f"  refused {ref['path']}: {ref['reason']}")
    for rec in r["reconciled"]:
        lines.append(f"  reconciled {rec['path']}: variant {rec['from']} -> {rec['to']}"
                     + (" (new original)" if rec["new_original"] else ""))  # fmt: skip
    return "\n".join(lines)


def render_gc(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return f"gc: skipped: {r['skipped']}"
    verb = "freed" if r["executed"] else "would free"
    text = f"gc: {verb} {human_bytes(r['bytes_freed'])}: {len(r['variants'])} variants, " \
           f"{len(r['blobs'])} blobs, {len(r['stray'])} stray files"
    return text if r["executed"] else text + "\n(dry run; `lorad gc --apply` to collect)"


# ---------------------------------------------------------------------------------------------
# Commands


def status_command(args: argparse.Namespace) -> int:
    return emit(args, call(args, "status"), render_status)


def list_command(args: argparse.Namespace) -> int:
    """The daemon answers a page at a time; the pages are joined here into one table or one JSON
    document."""
    if args.folder and args.folder_option and absolute_path(args.folder) != absolute_path(args.folder_option):
        raise LoradError("give the folder once (as FOLDER or --folder)")
    folder = args.folder or args.folder_option
    # The table asks for the brief form (what it shows, read in the page's own query); --json for
    # every variant of every LoRA.
    params = {"folder": absolute_path(folder) if folder else None, "policy": args.policy, "state": args.state,
              "sort": args.sort, "brief": not args.json}  # fmt: skip
    loras: list[dict[str, Any]] = []
    with Client(socket_path(args)) as client:
        after, total = None, 0
        while args.limit is None or len(loras) < args.limit:
            left = None if args.limit is None else args.limit - len(loras)
            page = client.call("list", **params, after=after, limit=left and min(left, LIST_PAGE))
            if after is None:
                total = page["total"]  # counted on the first page only
            loras += page["loras"]
            after = page["next"]
            if after is None:
                break
    return emit(args, loras, lambda x: render_list(x, total), _one_per_line)


def show_command(args: argparse.Namespace) -> int:
    return emit(args, call(args, "show", target=target_of(args.target)), render_show)


def find_command(args: argparse.Namespace) -> int:
    result = call(args, "find", hash=args.hash)
    emit(args, result, render_find)
    return 0 if result["matches"] else 1  # as grep: scripts can test for "found"


def revert_command(args: argparse.Namespace) -> int:
    return emit(args, call(args, "revert", path=absolute_path(args.path)), render_switched)


def switch_command(args: argparse.Namespace) -> int:
    return emit(args, call(args, "switch", path=absolute_path(args.path), variant=args.variant), render_switched)


def _enqueue(args: argparse.Namespace) -> int:
    result = call(args, "reduce", path=absolute_path(args.path), policy=getattr(args, "policy", None))
    return emit(args, result, render_enqueued)


# `lorad enqueue PATH [--policy P]`, and `lorad reduce PATH --policy P` (routed here by
# _cli_reduce): args need .path, .policy, .json, .socket, .config.
enqueue_command = _scriptable(_enqueue)


def _simple(method: str, render: Render) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        return emit(args, call(args, method), render)

    return command


DRAIN_HELP = """\
Take this node out of the work, e.g. before maintenance. The node finishes the jobs it is
running (each is recorded and, as its policy says, activated, as always), claims no new job, and
gives up the watched folders it watches: their leases are released, so another node of the fleet
takes each at its next renewal (within lease_seconds / 3) and rescans it; this node stops watching
at once. The node marks itself draining in the fleet (`lorad status` on any node shows it) and
keeps answering on its socket. `lorad resume` ends the drain (and a pause): the node claims jobs
again and takes back the folders that are free; those another node took stay with it. A restart
also ends it. With a single node (SQLite), nothing watches the folders while it drains.
--wait returns once the node runs no job (exit status 0), or at --timeout (exit status 1)."""


def render_drained(r: dict[str, Any]) -> str:
    lines = ["draining: no new job is claimed"]
    if r.get("folders_given_up"):
        lines.append("gave up: " + ", ".join(r["folders_given_up"]) + " (another node takes them)")
    running = r.get("running") or []
    lines.append(f"running: {len(running)} job(s) still finishing" if running else "running: nothing (drained)")
    return "\n".join(lines)


def drain_command(args: argparse.Namespace) -> int:
    result = call(args, "drain")
    if not args.wait:
        return emit(args, result, render_drained)
    started = time.monotonic()
    while result["running"]:
        if args.timeout is not None and time.monotonic() - started >= args.timeout:
            emit(args, result, render_drained)
            print(f"lorad: {len(result['running'])} job(s) still running after {args.timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.5)
        result = {**result, "running": call(args, "status")["running"]}
    return emit(args, {**result, "waited_s": round(time.monotonic() - started, 1)}, render_drained)


def gc_command(args: argparse.Namespace) -> int:
    return emit(args, call(args, "gc", dry_run=not args.apply), render_gc)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, help="the daemon's socket (default: from --config, $LORAD_SOCKET or the default path)")
    p.add_argument("--config", type=Path, help="read the socket path from this daemon config")
    p.add_argument("--json", action="store_true", help="print the reply as JSON (for scripts)")


def register(sub: argparse._SubParsersAction) -> None:
    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            description: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter if description else argparse.HelpFormatter)  # fmt: skip
        _common(p)
        p.set_defaults(func=_scriptable(func))
        return p

    add("status", status_command, "queue depth, the running job and its progress, device, space saved")
    p = add("list", list_command, "watched LoRAs with their variants")
    p.add_argument("folder", nargs="?", help="only LoRAs under this folder")
    p.add_argument("--folder", dest="folder_option", metavar="FOLDER", help="the same, as an option")
    p.add_argument("--policy", help="only LoRAs taken in under this policy")
    p.add_argument("--state", choices=LIST_STATES, help="only LoRAs whose path holds their original, a reduction, "
                                                   "or that lorad refused")
    p.add_argument("--sort", choices=LIST_SORTS, default="name",
                   help="name: by path (the default); saved, size: most first; date: newest taken in first")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N LoRAs")
    p = add("show", show_command, "one LoRA: variants, policy decisions, jobs, per-module metrics")
    p.add_argument("target", help="the LoRA's path or id")
    p = add("find", find_command, "which LoRA and variant a hash names (exit status 1: none)")
    p.add_argument("hash", help="sha256 or a prefix of 8+ hex digits, AutoV2, AutoV3, sshs_model_hash, BLAKE3 "
                                "(optionally as kind:HEX, e.g. blake3:...)")
    p = add("revert", revert_command, "put the original back at PATH")
    p.add_argument("path")
    p = add("switch", switch_command, "make VARIANT the file at PATH")
    p.add_argument("path")
    p.add_argument("variant", type=int, help="variant id (see `lorad show PATH`)")
    p = add("enqueue", _enqueue, "ask the daemon to reduce a watched file now")
    p.add_argument("path")
    p.add_argument("--policy", help="use this policy instead of the folder's")
    add("pause", _simple("pause", lambda r: "paused: no new job starts (the running one finishes)"), "start no new jobs")
    add("resume", _simple("resume", lambda r: "resumed"), "start jobs again; ends a pause and a drain")
    p = add("drain", drain_command, "finish the running jobs, claim no more, give up this node's folders",
            DRAIN_HELP)  # fmt: skip
    p.add_argument("--wait", action="store_true", help="return once the node runs no job")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up waiting after this long")
    add("rescan", _simple("rescan", render_rescan), "reconcile every watched folder now; retry jobs that failed for passing reasons")
    add("verify", _simple("verify", render_verify), "re-hash the store and the watched files; repair records")
    p = add("gc", gc_command, "collect unreferenced reduced variants (a dry run unless --apply)")
    p.add_argument("--apply", action="store_true", help="collect for real")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
