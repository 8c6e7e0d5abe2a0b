"""`lorad daemon`: run the daemon in the foreground (systemd runs it the same way)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorad.daemon.config import default_config, load_config, with_overrides
from lorad.errors import LoradError

# lorad.log.FORMATS: lorad.log is imported when the daemon runs, not here, since structlog (and the
# rich it loads) would add a tenth of a second to every `lorad` command, `lorad list` included.
LOG_FORMATS = ("auto", "json", "console")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "daemon",
        help="run the daemon in the foreground",
        description="Watch folders, reduce new LoRAs, serve the control socket. Without --config, "
        "serves an embedded default: state under the XDG state dir, the folders given by --watch.",
    )
    p.add_argument("--config", type=Path, help="YAML config file (see config.example.yaml)")
    p.add_argument("--watch", type=Path, action="append", default=[], metavar="DIR",
                   help="watch this folder with the default policy (repeatable)")  # fmt: skip
    p.add_argument("--state-dir", type=Path, help="store, database and temp files (overrides the config)")
    p.add_argument("--socket", type=Path, help="control socket path (overrides the config)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                   help="json: one object per line (default under systemd); console: for people")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=daemon_command)


def daemon_command(args: argparse.Namespace) -> int:
    from lorad.log import configure

    configure(args.log_format, args.log_level)
    if args.config:
        config = with_overrides(load_config(args.config), watch=args.watch, state_dir=args.state_dir, socket=args.socket)
    elif args.watch:
        config = default_config(args.watch, state_dir=args.state_dir, socket=args.socket)
    else:
        raise LoradError("nothing to watch: give --config FILE or --watch DIR")
    if not config.watch:
        print("lorad: warning: the config watches no folder; only the socket will be served", file=sys.stderr)
    from lorad.daemon.daemon import run

    return run(config)
