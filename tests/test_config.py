"""Config: YAML -> frozen, validated objects; every error names the key and its line."""

from __future__ import annotations

import dataclasses
import os
from datetime import time
from pathlib import Path

import pytest

from lorad.daemon.config import (
    ConfigError,
    GpuBusy,
    Window,
    default_config,
    default_cpu_threads,
    load_config,
    parse_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """\
state_dir: state
watch:
  - path: loras
policies:
  default:
    method: rank
    param: 8
"""


def test_example_config_loads_with_every_section() -> None:
    config = load_config(REPO / "config.example.yaml")
    assert [w.policy for w in config.watch] == ["default", "archive"]
    assert config.policies["default"].method == "fro"
    assert config.policies["default"].min_saving == pytest.approx(0.10)
    assert config.policies["archive"].budget_mb == 32
    assert config.policies["archive"].activate == "manual"
    assert config.schedule.reconcile_every == 3600
    assert config.schedule.gc_every == 86400
    assert config.database == "sqlite:////var/lib/lorad/lorad.db"
    assert config.policies["default"].min_fro_retained is None and config.policies["archive"].min_fro_retained == 0.8
    assert (config.nice, config.io_idle, config.cpu_threads) == (10, True, default_cpu_threads())
    assert config.gpu_busy == GpuBusy(util_above=30, free_below_mb=2048, check_every=5)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    file = tmp_path / "conf" / "lorad.yaml"
    file.parent.mkdir()
    file.write_text(MINIMAL)
    config = load_config(file)
    assert config.state_dir == tmp_path / "conf" / "state"
    assert config.watch[0].path == tmp_path / "conf" / "loras"
    assert config.database == f"sqlite:///{tmp_path / 'conf' / 'state' / 'lorad.db'}"
    assert config.watch[0].recursive is True and config.watch[0].poll is None


def test_unknown_top_level_key_names_key_and_line() -> None:
    text = MINIMAL + "sochet: /tmp/x.sock\n"
    with pytest.raises(ConfigError, match=r"line 8: unknown key 'sochet'"):
        parse_config(text, "my.yaml")


def test_unknown_policy_key_names_dotted_key_and_line() -> None:
    text = MINIMAL + "    min_savings: 0.2\n"
    with pytest.raises(ConfigError, match=r"my.yaml: line 8: unknown key 'policies.default.min_savings'"):
        parse_config(text, "my.yaml")


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("method: rank", "method: svd", r"line 6: policies.default.method: expected one of rank, fro, ratio"),
        ("param: 8", "param: 0.5", r"line 7: policies.default.param: method rank takes a whole rank"),
        ("param: 8", "param: eight", r"line 7: policies.default.param: expected a number, got 'eight'"),
        ("  - path: loras", "  - path: loras\n    recursive: maybe", r"line 4: watch\[0\].recursive: expected true or false"),
        ("  - path: loras", "  - path: loras\n    policy: fast", r"line 4: watch\[0\].policy: no policy named 'fast'"),
    ],
)
def test_bad_values_name_key_and_line(replace: str, by: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL.replace(replace, by), "c.yaml")


def test_bad_fraction_and_duration_and_device() -> None:
    with pytest.raises(ConfigError, match=r"line 8: policies.default.min_saving: 1.5 is out of range"):
        parse_config(MINIMAL + "    min_saving: 1.5\n")
    with pytest.raises(ConfigError, match=r"line 9: schedule.gc_every: expected a duration"):
        parse_config(MINIMAL + "schedule:\n  gc_every: weekly\n")
    with pytest.raises(ConfigError, match=r"line 8: device: expected one of auto, cpu, cuda"):
        parse_config(MINIMAL + "device: tpu\n")


def test_duplicate_keys_and_bad_yaml_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"line 8: duplicate key 'state_dir'"):
        parse_config(MINIMAL + "state_dir: other\n")
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        parse_config("watch: [a, b\npolicies: {}\n")


def test_budget_needs_budget_mb() -> None:
    text = "policies:\n  small:\n    method: budget\n"
    with pytest.raises(ConfigError, match=r"line 3: policies.small.method: method budget needs a size target in MiB"):
        parse_config(text)


def test_schedule_durations_and_window() -> None:
    text = MINIMAL + (
        "schedule:\n  reconcile_every: 10m\n  gc_every: off\n  retry_every: 90\n"
        "  window: {start: '22:30', end: '06:00'}\n"
    )
    schedule = parse_config(text).schedule
    assert schedule.reconcile_every == 600
    assert schedule.gc_every is None
    assert schedule.retry_every == 90
    assert schedule.window == Window(time(22, 30), time(6, 0))
    assert parse_config(MINIMAL + "schedule:\n  window: 01:00-05:30\n").schedule.window == Window(
        time(1, 0), time(5, 30)
    )


def test_window_contains_across_midnight() -> None:
    night = Window(time(22, 0), time(6, 0))
    assert night.contains(time(23, 0)) and night.contains(time(1, 0))
    assert not night.contains(time(12, 0)) and not night.contains(time(6, 0))
    day = Window(time(9, 0), time(17, 0))
    assert day.contains(time(9, 0)) and not day.contains(time(17, 0))


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = "cuda"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.policies["other"] = config.policies["default"]  # type: ignore[index]


def test_policy_hash_follows_what_changes_the_bytes() -> None:
    base = parse_config(MINIMAL).policies["default"]
    same_output = parse_config(MINIMAL + "    min_saving: 0.5\n    activate: manual\n").policies["default"]
    other_output = parse_config(MINIMAL.replace("param: 8", "param: 4")).policies["default"]
    assert base.hash == same_output.hash
    assert base.hash != other_output.hash


def test_default_config_and_overrides(tmp_path: Path) -> None:
    config = default_config([tmp_path / "loras"], state_dir=tmp_path / "state", socket=tmp_path / "s.sock")
    assert config.watch[0].path == tmp_path / "loras"
    assert config.watch[0].policy == "default"
    assert config.database == f"sqlite:///{tmp_path / 'state' / 'lorad.db'}"
    moved = with_overrides(config, watch=[tmp_path / "more"], state_dir=tmp_path / "elsewhere")
    assert [w.path for w in moved.watch] == [tmp_path / "loras", tmp_path / "more"]
    assert moved.database == f"sqlite:///{tmp_path / 'elsewhere' / 'lorad.db'}"


def test_watch_for_picks_the_deepest_folder_and_respects_recursion(tmp_path: Path) -> None:
    text = (
        f"watch:\n  - path: {tmp_path}/a\n  - path: {tmp_path}/a/b\n    policy: p2\n"
        f"  - path: {tmp_path}/flat\n    recursive: false\n"
        "policies:\n  default: {method: rank, param: 8}\n  p2: {method: fro, param: 0.9}\n"
    )
    config = parse_config(text)
    assert config.watch_for(tmp_path / "a" / "x.safetensors").policy == "default"
    assert config.watch_for(tmp_path / "a" / "b" / "c" / "x.safetensors").policy == "p2"
    assert config.watch_for(tmp_path / "flat" / "x.safetensors") is not None
    assert config.watch_for(tmp_path / "flat" / "sub" / "x.safetensors") is None
    assert config.watch_for(tmp_path / "elsewhere.safetensors") is None


def test_politeness_defaults() -> None:
    config = parse_config(MINIMAL)
    cores = len(os.sched_getaffinity(0))
    assert config.cpu_threads == max(1, cores - 1)  # all cores but one, at least one
    assert config.nice == 10 and config.io_idle is True
    assert config.gpu_busy == GpuBusy(util_above=30.0, free_below_mb=2048.0, check_every=5.0)
    assert config.policies["default"].min_fro_retained is None  # no floor unless the user sets one
    assert default_config([]).policies["default"].min_fro_retained is None


def test_politeness_settings_parse() -> None:
    text = MINIMAL + "    min_fro_retained: 0.85\ncpu_threads: 3\nnice: 19\nio_idle: false\ngpu_busy: {util_above: 50, check_every: 2s}\n"
    config = parse_config(text)
    assert config.policies["default"].min_fro_retained == 0.85
    assert (config.cpu_threads, config.nice, config.io_idle) == (3, 19, False)
    assert config.gpu_busy == GpuBusy(util_above=50.0, free_below_mb=None, check_every=2.0)  # only what it names
    assert parse_config(MINIMAL + "gpu_busy: off\n").gpu_busy is None
    assert parse_config(MINIMAL + "gpu_busy: {util_above: off, free_below_mb: 4096}\n").gpu_busy == GpuBusy(None, 4096.0, 5.0)
    assert parse_config(MINIMAL + "cpu_threads: auto\n").cpu_threads == default_cpu_threads()
    assert parse_config(MINIMAL + "    min_fro_retained: null\n").policies["default"].min_fro_retained is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("nice: 25\n", r"line 8: nice: must be 0..19"),
        ("nice: -5\n", r"line 8: nice: must be at least 0"),
        ("cpu_threads: 0\n", r"line 8: cpu_threads: must be at least 1"),
        ("io_idle: sometimes\n", r"line 8: io_idle: expected true or false"),
        ("gpu_busy: {util_above: 150}\n", r"line 8: gpu_busy.util_above: 150 is out of range"),
        ("gpu_busy: {util: 30}\n", r"line 8: unknown key 'gpu_busy.util'"),
        ("gpu_busy: {}\n", r"line 8: gpu_busy: name at least one of util_above, free_below_mb"),
    ],
)
def test_bad_politeness_settings_name_key_and_line(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(MINIMAL + extra)


def test_database_busy_timeout() -> None:
    assert parse_config(MINIMAL).database_busy_timeout == 10.0
    assert parse_config(MINIMAL + "database_busy_timeout: 2.5\n").database_busy_timeout == 2.5
    with pytest.raises(ConfigError, match=r"line 8: database_busy_timeout: .*out of range"):
        parse_config(MINIMAL + "database_busy_timeout: 0\n")
