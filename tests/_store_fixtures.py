"""Helpers for the store/library tests: small real LoRA files, a library in tmp_path, database
snapshots, and a child-process driver for the crash and disk-full tests.

Run as `python -m tests._store_fixtures OP ...` it is the child: it opens the library named on the
command line and runs one operation, so a test can kill it (LORAD_TEST_CRASH_AT) or limit it
(RLIMIT_FSIZE) without touching the test process. The child imports no torch, to start quickly.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def civitai_hashes(path: Path) -> dict[str, str]:
    """The identities users look a LoRA up by, from the raw bytes: AutoV2 (sha256, 10 hex) and
    AutoV3 (sha256 of the bytes after the safetensors header, 12 hex)."""
    raw = Path(path).read_bytes()
    data = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "autov2": sha256_of(path)[:10], "autov3": data[:12], "addnet": data}


def make_lora(path: Path, seed: int = 0, modules: int = 3, dim: int = 48, rank: int = 8) -> Path:
    """A kohya-style LoRA (lora_down r x in, lora_up out x r, 0-d alpha) with a decaying spectrum."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(modules):
        name = f"lora_unet_down_blocks_0_attentions_{i}_proj_in"
        decay = torch.tensor([0.5**k for k in range(rank)])
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, dim, generator=gen) * decay[:, None]
        tensors[f"{name}.lora_up.weight"] = torch.randn(dim, rank, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes a map's keys in hash order, which differs between calls,
    # and the tests rely on equal inputs giving equal bytes.
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return path


def reduce_with_engine(src: Path, dst: Path, rank: int):
    """The real engine's rank reduction of `src` into `dst`; returns its Report."""
    from lorad.engine.engine import ReduceSettings, reduce_file

    return reduce_file(src, dst, ReduceSettings(method="rank", param=rank, device="cpu"))


def table(lib: Any, name: str) -> list[dict[str, Any]]:
    """Every row of a table as plain dicts (raw SQL, independent of the ORM models)."""
    from sqlalchemy import text

    with lib.db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {name} ORDER BY 1"))]


def event_kinds(lib: Any) -> list[str]:
    return [e["kind"] for e in table(lib, "events")]


def assert_consistent(lib: Any) -> None:
    """The records and the disk agree: every active variant's blob is what its file holds, every
    recorded blob is intact in the store, the originals are recorded, foreign keys hold."""
    from sqlalchemy import text

    with lib.db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_key_check")).fetchall() == []
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    variants = {v["id"]: v for v in table(lib, "variants")}
    for blob in table(lib, "blobs"):
        assert sha256_of(lib.store.path_of(blob["sha256"])) == blob["sha256"]
    from lorad.pathtext import from_column

    for lora in table(lib, "loras"):
        path = Path(from_column(lora["path"]))  # raw SQL: the stored text form (lorad.pathtext)
        assert variants[lora["original_variant_id"]]["kind"] == "original"
        assert sha256_of(path) == variants[lora["active_variant_id"]]["blob_sha256"], path
        assert not (path.parent / f".{path.name}.lorad-tmp").exists()


# -- the child process ---------------------------------------------------------------------------


# Root reads a mode-000 file anyway (CAP_DAC_OVERRIDE). A process that lacks the two DAC
# capabilities meets file modes as any user does, while keeping root's uid for its own state.
WITHOUT_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def run_child(args: list[str], crash_at: str | None = None, fsize_limit: int | None = None,
              timeout: float = 60, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "LORAD_TEST_CRASH_AT"}
    if crash_at:
        env["LORAD_TEST_CRASH_AT"] = crash_at
    if fsize_limit is not None:
        env["LORAD_TEST_FSIZE"] = str(fsize_limit)
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "tests._store_fixtures", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _child(argv: list[str]) -> int:
    """OP STATE_DIR ROOT PATH [VARIANT] [--db=URL] [--mirror=DIR]: run one library operation (with
    --mirror, ROOT in mirror mode); print a JSON outcome."""
    limit = os.environ.get("LORAD_TEST_FSIZE")
    if limit:
        # Writes past the limit then fail with EFBIG, as a full disk fails with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    from lorad.errors import LoradError
    from lorad.library.library import Library

    url = next((a.removeprefix("--db=") for a in argv if a.startswith("--db=")), None)
    mirror = next((a.removeprefix("--mirror=") for a in argv if a.startswith("--mirror=")), None)
    op, state_dir, root, path, *rest = [a for a in argv if not a.startswith(("--db=", "--mirror="))]
    lib = Library(Path(state_dir), [Path(root)], database_url=url, link_mode="copy", migrate_on_open=False,
                  mirrors={Path(root): Path(mirror)} if mirror else None)  # fmt: skip
    try:
        if op == "ingest":
            lib.ingest(path, actor="test-child")
        elif op in ("activate", "switch"):
            getattr(lib, op)(path, int(rest[0]), actor="test-child")
        elif op == "revert":
            lib.revert(path, actor="test-child")
        elif op == "gc":
            lib.gc(dry_run=False, keep_variants=0, grace=__import__("datetime").timedelta(0))
        elif op == "verify":
            report = lib.verify(actor="test-child")
            print(json.dumps({"ok": True, "refused": [[str(p), r] for p, r in report.refused],
                              "unsettled": [str(p) for p in report.unsettled]}))  # fmt: skip
            return 0
        else:
            raise SystemExit(f"unknown op {op}")
    except LoradError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 3
    finally:
        lib.close()
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
