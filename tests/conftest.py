"""Shared pytest set-up. Per-area fixtures live in tests/_*_fixtures.py and tests/lora_factory.py."""

import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CUDA-only modules are collected only where a GPU is present (never shown as skipped in CI).
collect_ignore_glob = [] if torch.cuda.is_available() else ["test_cuda*.py"]
