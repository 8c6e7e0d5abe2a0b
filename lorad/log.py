"""structlog set-up: one JSON object per line under systemd, readable lines in a terminal.

Both structlog and stdlib loggers (APScheduler, watchdog, SQLAlchemy, alembic) go through one
`ProcessorFormatter`, so every line on stdout has the same shape. Under journald each JSON line is
prefixed with `<N>` (syslog priority), which journald strips and turns into the entry's priority.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict, Processor

FORMATS = ("auto", "json", "console")
_PRIORITY = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def choose_format(requested: str, env: Mapping[str, str], stdout: TextIO) -> str:
    """`json`, `journal` (JSON with a priority prefix) or `console`, from the flag and the setting."""
    if requested not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {requested!r}")
    journal = _stdout_is_journal(env, stdout)
    if requested == "json":
        return "journal" if journal else "json"
    if requested == "console":
        return "console"
    if journal or env.get("INVOCATION_ID"):
        return "journal" if journal else "json"
    return "console" if _isatty(stdout) else "json"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _stdout_is_journal(env: Mapping[str, str], stdout: TextIO) -> bool:
    """JOURNAL_STREAM names the journal's socket as dev:ino; children inherit it, so compare."""
    value = env.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def _journal_json(_logger: Any, _name: str, event_dict: EventDict) -> str:
    priority = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
    return f"<{priority}>" + json.dumps(event_dict, default=str, ensure_ascii=True)


def _json(_logger: Any, _name: str, event_dict: EventDict) -> str:
    return json.dumps(event_dict, default=str, ensure_ascii=True)


def _renderer(fmt: str) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return _journal_json if fmt == "journal" else _json


def configure(requested: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Route structlog and stdlib logging to `stream` (stdout); return the format chosen."""
    stream = stream or sys.stdout
    if hasattr(stream, "reconfigure"):
        # a file name that is not UTF-8 reaches log lines as lone surrogates: print them escaped
        # rather than lose the line to a UnicodeEncodeError
        stream.reconfigure(errors="backslashreplace")
    fmt = choose_format(requested, os.environ, stream)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt != "console":
        shared.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(fmt)],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for noisy in ("apscheduler", "watchdog", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return fmt


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


@contextmanager
def captured() -> Iterator[list[EventDict]]:
    """For tests: collect structlog events as dicts instead of printing them."""
    with capture_logs() as events:
        yield events
