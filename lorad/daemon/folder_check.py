"""The last check of an adapter folder before it is taken: lorad.engine.formats.lora.open_lora
run on it in a short-lived reduction process (`_reduce_child --check-folder`), because open_lora
loads torch and the daemon itself never does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorad.library.refusals import INCOMPLETE, INVALID, Refusal

CHECK_TIMEOUT = 600.0


def open_lora_refusal(folder: Path, nice: int = 10) -> Refusal | None:
    """Run lorad.engine.formats.lora.open_lora on the folder in a short-lived process (torch stays out of
    the daemon); its refusal, or None."""
    argv = [sys.executable, "-m", "lorad.daemon._reduce_child", "--check-folder", str(folder), "--nice", str(nice)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Refusal(INCOMPLETE, f"reading it took over {CHECK_TIMEOUT:.0f}s; waiting for it to change")
    lines = done.stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        verdict = None
    if not isinstance(verdict, dict):
        # The check itself failed to run (no room to start a process...): look again later.
        return Refusal(INCOMPLETE, f"could not be read (status {done.returncode}): {done.stderr.strip()[-300:]}")
    if verdict.get("ok"):
        return None
    return Refusal(INVALID, str(verdict.get("message", "refused by open_lora")))
