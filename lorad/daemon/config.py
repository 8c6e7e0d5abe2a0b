"""YAML -> frozen, validated daemon configuration and reduction policies.

Every value is checked once, here, so the rest of the daemon works on plain frozen data. A bad key
or value is one `ConfigError` naming the file, the line and the dotted key, and nothing starts.
Relative paths are resolved against the config file's folder; `~` and `$VARS` are expanded.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket as socketlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from lorad.engine.reduce import rank_rules
from lorad.engine.reduce.methods import METHODS
from lorad.engine.reduce.methods import validate as validate_method
from lorad.errors import LoradError, ReduceError

DEVICES = ("auto", "cpu", "cuda")
EFFECT_EXTRA = "pip install 'lorad[effect]'"
ACTIVATE = ("auto", "manual")
DEFAULT_POLICY = "default"
SOCKET_NAME = "lorad.sock"


class ConfigError(LoradError):
    """The configuration cannot be used as written."""


# ---------------------------------------------------------------------------------------------
# The configuration, as frozen data


@dataclass(frozen=True)
class QualityCheck:
    """A policy's gate on the LoRA's effect: after a reduction, the variant's effect on `base` is
    measured against the original's (lorad.engine.effect) and only a variant whose effect_retained
    (the mean over the samples) is at least `min_effect_retained` is activated."""

    base: Path  # a diffusers pipeline folder, a single-file checkpoint (with `config`), a causal-LM folder
    min_effect_retained: float
    config: Path | None = None  # a single-file checkpoint's local diffusers config folder
    device: str = "auto"  # auto: the job's own device


@dataclass(frozen=True)
class Policy:
    name: str
    method: str
    param: float | None = None
    max_rank: int | None = None
    budget_mb: float | None = None
    kohya_compat: bool = False
    min_saving: float = 0.10  # fraction of the original's bytes a variant must save to be activated
    # The whole file's retained Frobenius ratio (energy-weighted) a variant must keep to be activated.
    # None: no floor of its own. A built-in floor would second-guess the method: fro 0.9 with a
    # max_rank cap keeps less than 0.9 wherever the cap bites, by the user's own choice.
    min_fro_retained: float | None = None
    activate: str = "auto"  # auto: activate a variant that passes; manual: store it only
    keep_variants: int = 3  # reduced variants kept per LoRA (the original is always kept)
    # Rank rules for serving hosts (lorad.engine.reduce.rank_rules), applied after the method's choice.
    rank_multiple: int | None = None
    uniform: bool = False
    serve: str | None = None  # vllm, lorax or diffusers-hotswap: that server's preset
    # The effect gate (None: none). Not part of `hash`: it decides activation, not the bytes.
    quality_check: QualityCheck | None = None

    @property
    def hash(self) -> str:
        """Identity of what this policy produces: only the fields that change the variant's bytes."""
        doc = {
            "method": self.method,
            "param": self.param,
            "max_rank": self.max_rank,
            "budget_mb": self.budget_mb,
            "kohya_compat": self.kohya_compat,
        }
        rules = {"rank_multiple": self.rank_multiple, "uniform": self.uniform, "serve": self.serve}
        doc.update({k: v for k, v in rules.items() if v})  # unset rules leave older hashes as they were
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WatchDir:
    path: Path
    recursive: bool = True
    policy: str = DEFAULT_POLICY
    poll: bool | None = None  # None: decided from the filesystem type (network filesystems poll)
    # replace: the active variant replaces the file at its path. mirror: the file is never touched;
    # the active variant is written at the same relative path under `mirror_to` (lorad.library.mirror).
    mode: str = "replace"
    mirror_to: Path | None = None


@dataclass(frozen=True)
class Window:
    """A daily time window (local time); `end` before `start` means it spans midnight."""

    start: time
    end: time

    def contains(self, now: time) -> bool:
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end


@dataclass(frozen=True)
class Schedule:
    reconcile_every: float | None = 3600.0  # seconds; None disables the timer
    gc_every: float | None = 86400.0
    retry_every: float | None = 900.0
    window: Window | None = None


@dataclass(frozen=True)
class GpuBusy:
    """When the GPU counts as busy (someone is generating): then no job starts. A limit of None is
    not checked."""

    util_above: float | None = 30.0  # percent; checked before every job, whatever its device
    free_below_mb: float | None = 2048.0  # MiB free; checked only for jobs that run on the GPU
    check_every: float = 5.0  # seconds between looks while busy


def default_cpu_threads() -> int:
    """All the cores this process may use but one, so a foreground app keeps a core; at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


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
# Default locations (shared by the daemon and the client so both find the same socket)


def _is_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if _is_root():
        return Path("/var/lib/lorad")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "lorad"


def default_socket_path(state_dir: Path | None = None) -> Path:
    """The daemon's socket when the config names none."""
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if _is_root():
        return Path("/run/lorad") / SOCKET_NAME
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "lorad" / SOCKET_NAME
    return (state_dir or default_state_dir()) / SOCKET_NAME


def default_socket_candidates() -> tuple[Path, ...]:
    """Where a client looks when told nothing: this user's default, then the system daemon's."""
    return tuple(dict.fromkeys([default_socket_path(), Path("/run/lorad") / SOCKET_NAME]))


NODE_MAX = 64


def default_node() -> str:
    """This machine's name in a fleet when the config names none: its host name."""
    return socketlib.gethostname() or "localhost"


def default_database(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'lorad.db'}"


def default_policy() -> Policy:
    return Policy(name=DEFAULT_POLICY, method="fro", param=0.95)


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
# YAML with line numbers


class _Located(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode):  # type: ignore[no-untyped-def]
    data = _Located()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise ConfigError(f"{loader.name}: line {line}: keys must be strings, not {key!r}")
        if key in data:
            raise ConfigError(f"{loader.name}: line {line}: duplicate key {key!r}")
        data.key_lines[key] = line
        data[key] = loader.construct_object(value_node, deep=True)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise ConfigError(f"{source}: {where}: not valid YAML: {e.problem}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# Validation: small checkers over (value, where) that raise one ConfigError


@dataclass(frozen=True)
class _At:
    """Where a value sits: the file, the dotted key and its line."""

    source: str
    key: str
    line: int

    def child(self, mapping: _Located, key: str) -> _At:
        dotted = f"{self.key}.{key}" if self.key else key
        return _At(self.source, dotted, mapping.key_lines.get(key, mapping.line))

    def item(self, index: int, value: Any) -> _At:
        return _At(self.source, f"{self.key}[{index}]", getattr(value, "line", self.line))

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: line {self.line}: {self.key}: {message}")


def _mapping(value: Any, at: _At, allowed: Sequence[str] | None = None) -> _Located:
    if not isinstance(value, _Located):
        raise at.error(f"expected a mapping, got {_kind(value)}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                line = value.key_lines.get(key, value.line)
                dotted = f"{at.key}.{key}" if at.key else key
                raise ConfigError(
                    f"{at.source}: line {line}: unknown key {dotted!r} (allowed: {', '.join(allowed)})"
                )
    return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__.replace("_Located", "mapping")


def _bool(value: Any, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at.error(f"expected true or false, got {value!r}")
    return value


def _number(value: Any, at: _At, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise at.error(f"expected a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise at.error(f"{value!r} is out of range [{low}, {high}]")
    return float(value)


def _int(value: Any, at: _At, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(f"expected a whole number, got {value!r}")
    if value < low:
        raise at.error(f"must be at least {low}, got {value}")
    return value


def _fraction(value: Any, at: _At) -> float:
    """0..1, written as 0.1 or "10%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise at.error(f"expected a fraction like 0.1 or 10%, got {value!r}") from None
    return _number(value, at, 0.0, 1.0)


def _choice(value: Any, at: _At, choices: Sequence[str]) -> str:
    if value not in choices:
        raise at.error(f"expected one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _string(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error(f"expected a non-empty string, got {value!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, at: _At) -> float | None:
    """Seconds from 90, 2.5, "30s", "10m", "1h", "1d"; `off`/null/0 disables (None)."""
    if value is None or value is False or value == "off" or value == 0:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value, at, 0)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise at.error(f"expected a duration like 30s, 10m, 1h, 1d or off; got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)] or None


def _clock(value: Any, at: _At) -> time:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 01:30 as 90 (base 60)
        value = f"{value // 60:02d}:{value % 60:02d}"
    try:
        hours, minutes = str(value).split(":")
        return time(int(hours), int(minutes))
    except ValueError:
        raise at.error(f"expected a time of day HH:MM, got {value!r}") from None


def _path(value: Any, at: _At, base: Path) -> Path:
    text = os.path.expandvars(os.path.expanduser(_string(value, at)))
    return Path(os.path.abspath(base / text))


# ---------------------------------------------------------------------------------------------
# The sections

_TOP_KEYS = ("state_dir", "database", "socket", "device", "watch", "policies", "schedule",
             "settle_seconds", "poll_seconds", "workers", "lease_seconds", "max_attempts",
             "operator_group", "cpu_threads", "nice", "io_idle", "idle_exit", "gpu_busy",
             "database_busy_timeout", "metrics_listen", "node", "store_dir")  # fmt: skip
_POLICY_KEYS = ("method", "param", "max_rank", "budget_mb", "kohya_compat", "min_saving",
                "min_fro_retained", "activate", "keep_variants", "rank_multiple", "uniform", "serve",
                "quality_check")  # fmt: skip
_QUALITY_KEYS = ("base", "min_effect_retained", "config", "device")
_WATCH_KEYS = ("path", "recursive", "policy", "poll", "mode", "mirror_to")
WATCH_MODES = ("replace", "mirror")
_SCHEDULE_KEYS = ("reconcile_every", "gc_every", "retry_every", "window")
_WINDOW_KEYS = ("start", "end")
_GPU_BUSY_KEYS = ("util_above", "free_below_mb", "check_every")


def _quality_check(value: Any, at: _At, base_dir: Path) -> QualityCheck | None:
    """`quality_check: {base, min_effect_retained, config?, device?}` (null or off: no gate). The
    base is classified from its files here (a header read, nothing loaded), and the libraries the
    measurement needs are looked for, so a gate that could never pass stops the daemon at start
    instead of refusing every variant."""
    if value is None or value is False or value == "off":
        return None
    doc = _mapping(value, at, _QUALITY_KEYS)
    for key in ("base", "min_effect_retained"):
        if key not in doc:
            raise at.error(f"a quality_check needs `{key}`" + (
                " (a diffusers pipeline folder, a single-file checkpoint with `config`, or a transformers "
                "causal-LM folder)" if key == "base" else " (e.g. 0.98: the variant keeps 98% of the LoRA's effect)"))
    floor_at = at.child(doc, "min_effect_retained")
    floor = doc["min_effect_retained"]
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor != floor:
        raise floor_at.error(f"expected a number at most 1, got {floor!r}")
    if floor > 1 or floor == float("-inf"):
        raise floor_at.error(f"must be a finite number at most 1 (1: the variant keeps the whole effect; "
                             f"effect_retained is never above 1), got {floor!r}")  # fmt: skip
    base = _path(doc["base"], at.child(doc, "base"), base_dir)
    folder = _path(doc["config"], at.child(doc, "config"), base_dir) if "config" in doc else None
    device = _choice(doc.get("device", "auto"), at.child(doc, "device"), DEVICES)
    # lorad.engine.effect.base reads file names and a safetensors header only (no torch).
    from lorad.engine.effect.base import CAUSAL_LM, describe_base

    try:
        kind = describe_base(base, folder).kind
    except LoradError as e:
        key = "config" if folder is not None and str(folder) in str(e) else "base"
        raise at.child(doc, key).error(str(e).replace("--config", "`config`")) from None
    import importlib.util

    needed = ("peft", "transformers", *(() if kind == CAUSAL_LM else ("diffusers",)))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise at.error(f"measuring the effect needs {', '.join(missing)}, not installed: {EFFECT_EXTRA} "
                       "(or remove quality_check)")  # fmt: skip
    return QualityCheck(base=base, min_effect_retained=float(floor), config=folder, device=device)


def _policy(name: str, value: Any, at: _At, base_dir: Path) -> Policy:
    doc = _mapping(value, at, _POLICY_KEYS)
    if "method" not in doc:
        raise at.error("a policy needs a `method` (" + ", ".join(METHODS) + ")")
    fields: dict[str, Any] = {"name": name}
    checks: dict[str, Callable[[Any, _At], Any]] = {
        "method": lambda v, a: _choice(v, a, METHODS),
        "param": lambda v, a: None if v is None else _number(v, a, 0),
        "max_rank": lambda v, a: None if v is None else _int(v, a, 1),
        "budget_mb": lambda v, a: None if v is None else _number(v, a, 0),
        "kohya_compat": _bool,
        "min_saving": _fraction,
        "min_fro_retained": lambda v, a: None if v is None else _fraction(v, a),
        "activate": lambda v, a: _choice(v, a, ACTIVATE),
        "keep_variants": lambda v, a: _int(v, a, 1),
        "rank_multiple": lambda v, a: None if v is None else _int(v, a, 1),
        "uniform": _bool,
        "serve": lambda v, a: None if v is None else _choice(v, a, rank_rules.SERVERS),
    }
    for key, check in checks.items():
        if key in doc:
            fields[key] = check(doc[key], at.child(doc, key))
    if "quality_check" in doc:
        fields["quality_check"] = _quality_check(doc["quality_check"], at.child(doc, "quality_check"), base_dir)
    policy = Policy(**fields)
    _check_method_param(policy, doc, at)
    try:
        rank_rules.rule_for(policy.serve, policy.rank_multiple, policy.uniform, policy.max_rank)
    except ReduceError as e:
        key = next((k for k in ("serve", "rank_multiple", "uniform") if k in doc), "max_rank")
        raise at.child(doc, key).error(str(e)) from None
    return policy


def _check_method_param(policy: Policy, doc: _Located, at: _At) -> None:
    """Each method's parameter, checked here so a typo fails at start, not on the first file."""
    where = at.child(doc, "param") if "param" in doc else at.child(doc, "method")
    if policy.method == "budget":
        where = at.child(doc, "budget_mb") if "budget_mb" in doc else at.child(doc, "method")
    try:
        validate_method(policy.method, policy.param, policy.budget_mb)
    except ReduceError as e:
        raise where.error(str(e)) from None


def _policies(value: Any, at: _At, base_dir: Path) -> dict[str, Policy]:
    doc = _mapping(value, at)
    if not doc:
        raise at.error("define at least one policy")
    return {name: _policy(name, doc[name], at.child(doc, name), base_dir) for name in doc}


def _watch_dir(value: Any, at: _At, base: Path, policies: Mapping[str, Policy]) -> WatchDir:
    if isinstance(value, str):  # shorthand: a bare path
        return WatchDir(path=_path(value, at, base))
    doc = _mapping(value, at, _WATCH_KEYS)
    if "path" not in doc:
        raise at.error("a watched folder needs a `path`")
    policy = doc.get("policy", DEFAULT_POLICY)
    if policy not in policies:
        raise at.child(doc, "policy").error(
            f"no policy named {policy!r} (defined: {', '.join(policies) or 'none'})"
        )
    poll = doc.get("poll")
    mode = _choice(doc.get("mode", "replace"), at.child(doc, "mode"), WATCH_MODES)
    mirror_to = _path(doc["mirror_to"], at.child(doc, "mirror_to"), base) if "mirror_to" in doc else None
    if mode == "mirror" and mirror_to is None:
        raise at.child(doc, "mode").error("mode: mirror needs `mirror_to: DIR`, where the active variants go")
    if mode != "mirror" and mirror_to is not None:
        raise at.child(doc, "mirror_to").error("mirror_to is for mode: mirror (this folder's mode is replace)")
    return WatchDir(
        path=_path(doc["path"], at.child(doc, "path"), base),
        recursive=_bool(doc.get("recursive", True), at.child(doc, "recursive")),
        policy=str(policy),
        poll=None if poll in (None, "auto") else _bool(poll, at.child(doc, "poll")),
        mode=mode,
        mirror_to=mirror_to,
    )


def _watch(value: Any, at: _At, base: Path, policies: Mapping[str, Policy]) -> tuple[WatchDir, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise at.error(f"expected a list of folders, got {_kind(value)}")
    dirs = tuple(_watch_dir(v, at.item(i, v), base, policies) for i, v in enumerate(value))
    seen: set[Path] = set()
    for i, w in enumerate(dirs):
        if w.path in seen:
            raise at.item(i, value[i]).error(f"{w.path} is listed twice")
        seen.add(w.path)
    mirrors = [(i, w.mirror_to) for i, w in enumerate(dirs) if w.mirror_to is not None]
    for i, mirror in mirrors:
        for w in dirs:
            # lorad must never watch what it writes, nor write into what it watches.
            if _within(mirror, w.path) or _within(w.path, mirror):
                raise at.item(i, value[i]).error(f"mirror_to {mirror} overlaps the watched folder {w.path}; "
                                                 "choose a folder outside every watched one")  # fmt: skip
        if sum(1 for _, other in mirrors if other == mirror) > 1:
            raise at.item(i, value[i]).error(f"mirror_to {mirror} is used by two watched folders")
    return dirs


def _within(path: Path, folder: Path) -> bool:
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == top or top in real.parents


def _window(value: Any, at: _At) -> Window | None:
    if value is None or value == "off":
        return None
    if isinstance(value, str):  # shorthand "01:00-06:00"
        start, sep, end = value.partition("-")
        if not sep:
            raise at.error(f"expected HH:MM-HH:MM or {{start, end}}, got {value!r}")
        window = Window(_clock(start.strip(), at), _clock(end.strip(), at))
    else:
        doc = _mapping(value, at, _WINDOW_KEYS)
        for key in _WINDOW_KEYS:
            if key not in doc:
                raise at.error(f"a window needs `{key}`")
        window = Window(_clock(doc["start"], at.child(doc, "start")), _clock(doc["end"], at.child(doc, "end")))
    if window.start == window.end:
        raise at.error("the window's start and end are equal (an empty window)")
    return window


def _schedule(value: Any, at: _At) -> Schedule:
    doc = _mapping(value, at, _SCHEDULE_KEYS)
    fields: dict[str, Any] = {}
    for key in ("reconcile_every", "gc_every", "retry_every"):
        if key in doc:
            fields[key] = parse_duration(doc[key], at.child(doc, key))
    if "window" in doc:
        fields["window"] = _window(doc["window"], at.child(doc, "window"))
    return Schedule(**fields)


def _gpu_busy(value: Any, at: _At) -> GpuBusy | None:
    """off (or null): never wait; a mapping: exactly the checks it names (a missing check is off)."""
    if value is None or value is False or value == "off":
        return None
    doc = _mapping(value, at, _GPU_BUSY_KEYS)
    if not doc:
        raise at.error("name at least one of util_above, free_below_mb (or write `off`)")

    def limit(key: str, high: float | None) -> float | None:
        v = doc.get(key)
        off = v is None or v is False or v == "off"  # YAML 1.1 reads a bare off as false
        return None if off else _number(v, at.child(doc, key), 0, high)

    every = parse_duration(doc["check_every"], at.child(doc, "check_every")) if "check_every" in doc else 5.0
    return GpuBusy(util_above=limit("util_above", 100), free_below_mb=limit("free_below_mb", None),
                   check_every=every or 5.0)  # fmt: skip


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


def _node(value: Any, at: _At) -> str:
    """A node name, as the fleet's records and `lorad status` show it: printable, at most 64."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise at.error(f"expected a name, got {value!r}")
    name = str(value)
    if not name.strip():
        raise at.error("must not be empty")
    if name != name.strip() or not name.isprintable():
        raise at.error(f"must be printable, without leading or trailing spaces; got {name!r}")
    if len(name) > NODE_MAX:
        raise at.error(f"must be at most {NODE_MAX} characters, got {len(name)}")
    return name


_LISTEN_EXAMPLE = '127.0.0.1:9466, 0.0.0.0:9466 or "[::1]:9466" (quoted: YAML reads a bare [ as a list)'
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def parse_listen(value: Any, at: _At) -> tuple[str, int] | None:
    """`host:port` (an IPv6 address in brackets) -> (host, port); off/null: None."""
    if value is None or value is False or value == "off":
        return None
    if not isinstance(value, str):
        raise at.error(f"expected host:port, e.g. {_LISTEN_EXAMPLE}; got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise at.error(f"expected [IPv6 address]:port, e.g. [::1]:9466; got {value!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise at.error(f"{host!r} is not an IPv6 address (in {value!r})") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise at.error(f"expected host:port, e.g. {_LISTEN_EXAMPLE}; got {value!r}")
        if ":" in host:
            raise at.error(f"an IPv6 address goes in brackets, quoted: \"[{host}]:{port}\"; got {value!r}")
        if host.replace(".", "").isdigit():
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise at.error(f"{host!r} is not an IPv4 address (in {value!r})") from None
        elif len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
            raise at.error(f"{host!r} is not a host name or address (in {value!r})")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise at.error(f"the port must be a number 1..65535, got {port!r} (in {value!r})")
    return host, int(port)


def listen_text(listen: tuple[str, int]) -> str:
    """(host, port) as written in the config: an IPv6 address in brackets."""
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nice(value: Any, at: _At) -> int:
    nice = _int(value, at, 0)
    if nice > 19:
        raise at.error(f"must be 0..19 (19 is the politest), got {nice}")
    return nice


def _cpu_threads(value: Any, at: _At) -> int:
    if value is None or value == "auto":
        return default_cpu_threads()
    return _int(value, at, 1)


def _database(value: Any, at: _At, base: Path) -> str:
    url = _string(value, at)
    if "://" not in url:  # a bare path means a SQLite file
        return f"sqlite:///{_path(url, at, base)}"
    return url


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
