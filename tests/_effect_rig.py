"""A real daemon for the tests of what is measured or rendered with the variants it makes: `lorad
effect`, `lorad preview` and the policy's quality_check. `running_daemon` starts one on a config of
the test's own; `sd_daemon` is the one `lorad effect PATH` and `lorad preview PATH` need, watching
`sd/` under a lenient rank-2 policy that activates what it makes; and the readers of what it made.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests._daemon_fixtures import Daemon, cli_json, write_config

SD_WATCH = "  - path: {folder}\n    policy: lenient\n"
LENIENT = """\
  lenient:
    method: rank
    param: 2
    min_saving: 0.1
    activate: auto
"""


@contextmanager
def running_daemon(tmp: Path, **config: Any) -> Iterator[Daemon]:
    """`lorad daemon` on write_config(tmp, **config), logging to tmp/daemon.log; stopped with SIGTERM."""
    daemon = Daemon(write_config(tmp, **config), tmp / "daemon.log").start()
    try:
        yield daemon
    finally:
        daemon.stop(signal.SIGTERM)


@contextmanager
def sd_daemon(tmp: Path) -> Iterator[Daemon]:
    """A daemon watching tmp/sd (and write_config's tmp/loras) under the lenient policy."""
    (tmp / "sd").mkdir()
    with running_daemon(tmp, watch_extra=SD_WATCH.format(folder=tmp / "sd"), extra_policies=LENIENT) as daemon:
        yield daemon


def socket_of(tmp: Path) -> Path:
    return tmp / "run" / "lorad.sock"


def reduced(config: Path, path: Path, active: bool = True) -> dict[str, Any] | None:
    """The `list --json` entry of `path` once it has a reduced variant (active, when asked)."""
    entry = next((x for x in cli_json(config, "list") if x["path"] == str(path)), None)
    if entry is None:
        return None
    variants = [v for v in entry["variants"] if v["kind"] == "reduced" and (v["active"] or not active)]
    return entry if variants else None


def variant_of(entry: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(v for v in entry["variants"] if v["kind"] == kind)
