"""The Prometheus endpoint (`metrics_listen`): the real daemon in a subprocess, scraped over HTTP and
parsed with prometheus_client's own parser; the config's checks; a port in use refused at start."""

from __future__ import annotations

import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from lorad.daemon.config import ConfigError, listen_text, parse_config
from tests._daemon_fixtures import Daemon, cli_json, make_lora, wait_for, write_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_config(tmp: Path, port: int) -> Path:
    config = write_config(tmp)
    config.write_text(config.read_text() + f"metrics_listen: 127.0.0.1:{port}\n")
    return config


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Path, Daemon, int]]:
    port = free_port()
    daemon = Daemon(metrics_config(tmp_path, port), tmp_path / "daemon.log")
    yield tmp_path, daemon, port
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)


def test_scraped_figures_match_the_daemon(rig: tuple[Path, Daemon, int]) -> None:
    tmp, daemon, port = rig
    loras = tmp / "loras"
    files = [make_lora(loras / f"lora{i}.safetensors", seed=i) for i in range(3)]
    daemon.start()
    refused = loras / "model.safetensors"
    refused.write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle under a .safetensors name
    save_file({"weight": torch.ones(4, 4)}, str(loras / "not_a_lora.safetensors"))  # taken in; its job fails

    def settled() -> tuple[Samples, dict[str, str]] | None:
        samples, types = scrape(port)
        done = value(samples, "lorad_jobs_done_total") == len(files)
        done &= value(samples, "lorad_jobs_failed_total", retried="false") == 1
        quiet = value(samples, "lorad_queue_depth") == 0
        return (samples, types) if done and quiet and value(samples, "lorad_refused_files", cause="pickle") == 1 else None

    samples, types = wait_for(settled, 90, 0.2, "every job done and the pickle refused, as the metrics say")
    status = cli_json(daemon.config, "status")
    assert status["queue"]["done"] == len(files) and status["queue"]["failed"] == 1 and status["queue_depth"] == 0

    assert types["lorad_jobs_done"] == "counter" and types["lorad_jobs_failed"] == "counter"
    assert types["lorad_job_duration_seconds"] == "histogram"
    assert types["lorad_info"] == "gauge"  # an info, as text format 0.0.4 writes it
    assert value(samples, "lorad_job_duration_seconds_count", outcome="done") == len(files)
    assert value(samples, "lorad_job_duration_seconds_bucket", outcome="done", le="1800.0") == len(files)
    assert value(samples, "lorad_job_duration_seconds_count", outcome="failed") == 1
    assert 0 < value(samples, "lorad_job_duration_seconds_sum", outcome="done") < 90
    assert value(samples, "lorad_jobs_failed_total", retried="true") == 0  # a bad input fails for good at once
    for state, n in status["queue"].items():
        assert value(samples, "lorad_queue_jobs", state=state) == n
    assert value(samples, "lorad_queue_jobs", state="done") == len(files)
    assert value(samples, "lorad_queue_depth") == 0
    assert value(samples, "lorad_loras") == status["loras"] == len(files) + 1
    assert status["saved_bytes"] > 0
    assert value(samples, "lorad_saved_bytes") == status["saved_bytes"]
    assert value(samples, "lorad_original_bytes") == status["original_bytes"]
    assert value(samples, "lorad_active_bytes") == status["active_bytes"]
    assert value(samples, "lorad_refused_files", cause="pickle") == 1
    assert value(samples, "lorad_refused_files", cause="invalid") == 0  # every cause is a series
    [watched] = status["watch"]
    assert value(samples, "lorad_folder_leader", folder=watched["path"]) == 1
    assert value(samples, "lorad_database_up") == 1
    [(info_labels, info)] = [(dict(labels), v) for (name, labels), v in samples.items() if name == "lorad_info"]
    assert info == 1
    assert info_labels["version"] == status["version"] and info_labels["device"] == status["device"] == "cpu"
    assert info_labels["node"] == socket.gethostname()

    assert daemon.stop() == 0  # and the endpoint goes with it
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_port_in_use_stops_the_start_with_one_line(rig: tuple[Path, Daemon, int]) -> None:
    tmp, daemon, port = rig
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        daemon.start(wait_ready=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 2
    want = f"lorad: error: metrics_listen 127.0.0.1:{port}: cannot serve the metrics there: address already in use"
    lines = daemon.log_path.read_text().splitlines()
    assert lines.count(want) == 1, daemon.log_tail()
    assert not any("Traceback" in line for line in lines), daemon.log_tail()
    assert not (tmp / "run" / "lorad.sock").exists()  # the control socket it had bound is gone


@pytest.mark.parametrize("written, listen", [
    ("127.0.0.1:9466", ("127.0.0.1", 9466)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ('"[::1]:9466"', ("::1", 9466)),
    ("'[::]:9466'", ("::", 9466)),
    ("metrics.example.org:9466", ("metrics.example.org", 9466)),
    ("off", None),
])  # fmt: skip
def test_metrics_listen_parses(written: str, listen: tuple[str, int] | None) -> None:
    config = parse_config(f"metrics_listen: {written}\n")
    assert config.metrics_listen == listen
    if listen is not None:
        assert listen_text(listen) == written.strip("'\"")
    assert parse_config("device: cpu\n").metrics_listen is None  # off unless set


@pytest.mark.parametrize("written, message", [
    ("9466", "metrics_listen: expected host:port, e.g. 127.0.0.1:9466"),
    ("127.0.0.1", "metrics_listen: expected host:port"),
    ("127.0.0.1:0", "the port must be a number 1..65535, got '0'"),
    ("127.0.0.1:65536", "the port must be a number 1..65535, got '65536'"),
    ("127.0.0.1:http", "the port must be a number 1..65535, got 'http'"),
    ("::1:9466", 'an IPv6 address goes in brackets, quoted: "[::1]:9466"'),
    ('"[::1]9466"', "expected [IPv6 address]:port"),
    ('"[fe80::zz]:9466"', "'fe80::zz' is not an IPv6 address"),
    ("256.0.0.1:9466", "'256.0.0.1' is not an IPv4 address"),
    ("bad_host:9466", "'bad_host' is not a host name or address"),
    ("[127.0.0.1, 9466]", "metrics_listen: expected host:port"),
])  # fmt: skip
def test_bad_metrics_listen_is_one_clear_error(written: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"device: cpu\nmetrics_listen: {written}\n", "lorad.yaml")
    text = str(caught.value)
    assert text.startswith("lorad.yaml: line 2: metrics_listen: ") and message in text and "\n" not in text


def test_metrics_listen_without_prometheus_client_refuses_to_start(tmp_path: Path) -> None:
    """Run as its own process with prometheus_client hidden: the daemon stops before touching
    anything and names the extra to install."""
    import subprocess
    import sys

    from tests._daemon_fixtures import REPO, lorad_env

    config = metrics_config(tmp_path, free_port())
    hide = ("import sys; sys.modules['prometheus_client'] = None; "
            "from lorad.cli.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", hide, "daemon", "--config", str(config), "--log-format", "json"],
                            capture_output=True, text=True, env=lorad_env(), cwd=str(REPO), timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert ("lorad: error: metrics_listen is set but prometheus_client is not installed: "
            "pip install 'lorad[metrics]'") in result.stderr  # fmt: skip
    assert not (tmp_path / "state" / "lorad.db").exists()  # refused before the database was made


def test_a_scrape_answers_while_the_database_is_away(tmp_path: Path) -> None:
    """In process, on stand-ins for the daemon's parts: the queries failing leave lorad_database_up 0
    and the rest of the page served; the worker's hook counts by the state the job was left in."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from lorad.daemon.metrics import Metrics

    def away() -> None:
        raise OSError("connection refused")

    parts = SimpleNamespace(config=parse_config("device: cpu\n"), device="cpu", queue=SimpleNamespace(counts=away),
                            library=SimpleNamespace(), leading=lambda: {tmp_path / "a": True, tmp_path / "b": False})
    metrics = Metrics(parts, ("127.0.0.1", free_port()))  # type: ignore[arg-type]
    for state, seconds in (("done", 0.05), ("pending", 3.0), ("failed", 4000.0)):
        metrics.job_finished(state, seconds)
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        samples.update({(s.name, frozenset(s.labels.items())): s.value for s in family.samples})
    assert value(samples, "lorad_database_up") == 0
    assert not any(name == "lorad_queue_depth" for name, _ in samples)
    assert value(samples, "lorad_folder_leader", folder=str(tmp_path / "a")) == 1
    assert value(samples, "lorad_folder_leader", folder=str(tmp_path / "b")) == 0
    assert value(samples, "lorad_jobs_done_total") == 1
    assert value(samples, "lorad_jobs_failed_total", retried="true") == value(samples, "lorad_jobs_failed_total", retried="false") == 1
    assert value(samples, "lorad_job_duration_seconds_bucket", outcome="done", le="0.1") == 1
    assert value(samples, "lorad_job_duration_seconds_bucket", outcome="failed", le="1800.0") == 1  # the 3 s one
    assert value(samples, "lorad_job_duration_seconds_count", outcome="failed") == 2
