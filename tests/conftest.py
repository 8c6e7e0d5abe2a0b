"""Shared pytest set-up. Per-area fixtures live in tests/_*_fixtures.py and tests/lora_factory.py."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CUDA-only modules are collected only where a GPU is present (never shown as skipped in CI).
collect_ignore_glob = [] if torch.cuda.is_available() else ["test_cuda*.py"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Path, "Daemon"]]:  # noqa: F821 (imported below, lazily)
    """(tmp_path, a Daemon whose config watches tmp_path/loras, not yet started); killed after."""
    from tests._daemon_fixtures import Daemon, write_config

    daemon = Daemon(write_config(tmp_path), tmp_path / "daemon.log")
    yield tmp_path, daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGKILL)
