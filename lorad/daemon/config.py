"""YAML -> frozen, validated daemon configuration and reduction policies.

Every value is checked once, at load, so the rest of the daemon works on plain frozen data. A bad key
or value is one `ConfigError` naming the file, the line and the dotted key, and nothing starts.
Relative paths are resolved against the config file's folder; `~` and `$VARS` are expanded.

This module is the face: the `Config` dataclass, parse_config and load_config (the top-level keys),
default_config and with_overrides. Each section and its checks live beside it, and every name
importable from here before the split still is:

  _config_yaml.py    YAML with line numbers, `_At` (where a value sits), ConfigError
  _config_values.py  small value checkers: numbers, durations, paths, listen addresses, node names
  host_defaults.py   this host's defaults: state folder, socket, database, node name, threads
  policies.py        Policy, QualityCheck and the `policies` section
  watch_rules.py     WatchDir and the `watch` section (mirror rules included)
  schedule_rules.py  Schedule, Window, GpuBusy and the `schedule` and `gpu_busy` sections
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lorad.daemon._config_values import (
    DEVICES,
    NODE_MAX,
    _bool,
    _choice,
    _cpu_threads,
    _database,
    _int,
    _nice,
    _node,
    _number,
    _path,
    _string,
    listen_text,
    parse_duration,
    parse_listen,
)
from lorad.daemon._config_yaml import ConfigError, _At, _Located, _mapping, _read_yaml
from lorad.daemon.host_defaults import (
    SOCKET_NAME,
    default_cpu_threads,
    default_database,
    default_node,
    default_socket_candidates,
    default_socket_path,
    default_state_dir,
)
from lorad.daemon.policies import ACTIVATE, DEFAULT_POLICY, EFFECT_EXTRA, Policy, QualityCheck, _policies, default_policy
from lorad.daemon.schedule_rules import GpuBusy, Schedule, Window, _gpu_busy, _schedule
from lorad.daemon.watch_rules import WATCH_MODES, WatchDir, _watch

# The names importers take from here: most are defined in the modules beside this one and
# re-exported, so `from lorad.daemon.config import ...` keeps working wherever it is written.
__all__ = [
    "ACTIVATE", "DEFAULT_POLICY", "DEVICES", "EFFECT_EXTRA", "NODE_MAX", "SOCKET_NAME", "WATCH_MODES",
    "Config", "ConfigError", "GpuBusy", "Policy", "QualityCheck", "Schedule", "WatchDir", "Window",
    "default_config", "default_cpu_threads", "default_database", "default_node", "default_policy",
    "default_socket_candidates", "default_socket_path", "default_state_dir", "listen_text",
    "load_config", "parse_config", "parse_duration", "parse_listen", "with_overrides",
]  # fmt: skip


@dataclass(frozen=True)
class Config:
    state_dir: Path
    database: str
    socket: Path
    device: str = "auto"
    watch: tuple[WatchDir, ...] = ()
    policies: Mapping[str, Policy] = field(default_factory=lambda: MappingProxyType({}))
    schedule: Schedule = Schedule()
    settle_seconds: float = 2.0  # how long (size, mtime, inode) must stay unchanged
    poll_seconds: float = 5.0  # polling interval for folders that poll
    workers: int = 1  # concurrent reduction jobs; 1 owns the GPU, more only makes sense on CPU
    lease_seconds: float = 60.0  # a running job's lease, renewed by its heartbeat
    max_attempts: int = 3
    # How long a write waits for another holder of SQLite's write lock before the operation is
    # given up as transient (and retried): a backup tool or `sqlite3` holding the file.
    database_busy_timeout: float = 10.0
    operator_group: str | None = None  # members may call mutating methods
    # Politeness towards the apps the user runs in the foreground (ComfyUI, Forge...):
    cpu_threads: int = field(default_factory=default_cpu_threads)  # torch threads per reduction
    nice: int = 10  # the reduction process's niceness (raised to this, never lowered)
    io_idle: bool = True  # the reduction process reads and writes in the idle I/O class
    # Seconds a reduction process waits for another job before it exits (0: after each job). While
    # it lives it holds torch and, on a GPU, a CUDA context; starting one costs 1 to 2 s.
    idle_exit: float = 30.0
    gpu_busy: GpuBusy | None = GpuBusy()  # None: start jobs whatever the GPU is doing
    # (host, port) of this node's Prometheus endpoint (lorad.daemon.metrics); None: not served.
    metrics_listen: tuple[str, int] | None = None
    # Fleet mode: this machine's name in the fleet, and the store's root (None: <state_dir>/store),
    # which may be on a filesystem every node mounts; state_dir stays local.
    node: str = field(default_factory=lambda: default_node())
    store_dir: Path | None = None
    source: str = "<embedded default>"

    @property
    def store_root(self) -> Path:
        """Where the blob store lives: `store_dir`, else <state_dir>/store."""
        return self.store_dir if self.store_dir is not None else self.state_dir / "store"

    def policy_for(self, watch: WatchDir) -> Policy:
        return self.policies[watch.policy]

    def watch_for(self, path: Path) -> WatchDir | None:
        """The watched folder a path lies in (the deepest one), or None."""
        path = Path(os.path.abspath(path))
        best: WatchDir | None = None
        for w in self.watch:
            if path == w.path or w.path in path.parents:
                if not w.recursive and path.parent != w.path:
                    continue
                if best is None or len(w.path.parts) > len(best.path.parts):
                    best = w
        return best


# ---------------------------------------------------------------------------------------------
# The embedded default, and command-line flags over a loaded config


def default_config(
    watch: Sequence[Path] = (), state_dir: Path | None = None, socket: Path | None = None
) -> Config:
    """The embedded configuration `lorad daemon` serves without --config."""
    state = Path(os.path.abspath(state_dir or default_state_dir()))
    return Config(
        state_dir=state,
        database=default_database(state),
        socket=Path(os.path.abspath(socket)) if socket else default_socket_path(state),
        watch=tuple(WatchDir(path=Path(os.path.abspath(p))) for p in watch),
        policies=MappingProxyType({DEFAULT_POLICY: default_policy()}),
    )


def with_overrides(
    config: Config,
    watch: Sequence[Path] = (),
    state_dir: Path | None = None,
    socket: Path | None = None,
) -> Config:
    """Command-line flags over a loaded config: extra watched folders, another state dir or socket."""
    changes: dict[str, Any] = {}
    if state_dir is not None:
        state = Path(os.path.abspath(state_dir))
        changes["state_dir"] = state
        if config.database == default_database(config.state_dir):
            changes["database"] = default_database(state)
    if socket is not None:
        changes["socket"] = Path(os.path.abspath(socket))
    if watch:
        known = {w.path for w in config.watch}
        if DEFAULT_POLICY not in config.policies:
            raise ConfigError(f"{config.source}: --watch needs a policy named {DEFAULT_POLICY!r}")
        extra = [WatchDir(path=p) for p in (Path(os.path.abspath(w)) for w in watch) if p not in known]
        changes["watch"] = config.watch + tuple(extra)
    return replace(config, **changes)


# ---------------------------------------------------------------------------------------------
# The top-level keys

_TOP_KEYS = ("state_dir", "database", "socket", "device", "watch", "policies", "schedule",
             "settle_seconds", "poll_seconds", "workers", "lease_seconds", "max_attempts",
             "operator_group", "cpu_threads", "nice", "io_idle", "idle_exit", "gpu_busy",
             "database_busy_timeout", "metrics_listen", "node", "store_dir")  # fmt: skip


def _config(doc: Any, source: str, base: Path) -> Config:
    root = _At(source, "", getattr(doc, "line", 1))
    if doc is None:
        doc = _Located()
        doc.line, doc.key_lines = 1, {}
    doc = _mapping(doc, root, _TOP_KEYS)
    at = lambda key: root.child(doc, key)  # noqa: E731
    state_dir = _path(doc["state_dir"], at("state_dir"), base) if "state_dir" in doc else default_state_dir()
    policies = _policies(doc["policies"], at("policies"), base) if "policies" in doc else {DEFAULT_POLICY: default_policy()}
    group = doc.get("operator_group")
    return Config(
        state_dir=state_dir,
        database=_database(doc["database"], at("database"), base) if "database" in doc else default_database(state_dir),
        socket=_path(doc["socket"], at("socket"), base) if "socket" in doc else default_socket_path(state_dir),
        device=_choice(doc.get("device", "auto"), at("device"), DEVICES),
        watch=_watch(doc.get("watch"), at("watch"), base, policies),
        policies=MappingProxyType(policies),
        schedule=_schedule(doc["schedule"], at("schedule")) if "schedule" in doc else Schedule(),
        settle_seconds=_number(doc.get("settle_seconds", 2.0), at("settle_seconds"), 0, 3600),
        poll_seconds=_number(doc.get("poll_seconds", 5.0), at("poll_seconds"), 0.05, 3600),
        workers=_int(doc.get("workers", 1), at("workers"), 1),
        lease_seconds=_number(doc.get("lease_seconds", 60.0), at("lease_seconds"), 1, 86400),
        max_attempts=_int(doc.get("max_attempts", 3), at("max_attempts"), 1),
        database_busy_timeout=_number(doc.get("database_busy_timeout", 10.0), at("database_busy_timeout"), 0.1, 600),
        operator_group=None if group is None else _string(group, at("operator_group")),
        cpu_threads=_cpu_threads(doc.get("cpu_threads"), at("cpu_threads")),
        nice=_nice(doc.get("nice", 10), at("nice")),
        io_idle=_bool(doc.get("io_idle", True), at("io_idle")),
        idle_exit=parse_duration(doc.get("idle_exit", 30.0), at("idle_exit")) or 0.0,
        gpu_busy=_gpu_busy(doc["gpu_busy"], at("gpu_busy")) if "gpu_busy" in doc else GpuBusy(),
        metrics_listen=parse_listen(doc["metrics_listen"], at("metrics_listen")) if "metrics_listen" in doc else None,
        node=_node(doc["node"], at("node")) if "node" in doc else default_node(),
        store_dir=_path(doc["store_dir"], at("store_dir"), base) if "store_dir" in doc else None,
        source=source,
    )


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate YAML text into a Config; `base` resolves relative paths (default: the cwd)."""
    return _config(_read_yaml(text, source), source, base or Path.cwd())


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from e
    return parse_config(text, str(path), Path(os.path.abspath(path)).parent)
