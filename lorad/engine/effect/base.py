"""What the base model is (from its files, before anything heavy loads) and the hash that names it.

Three kinds: a diffusers pipeline folder (model_index.json); a single-file checkpoint (.safetensors)
read with a local diffusers config folder; a transformers causal-LM folder (config.json naming a
*ForCausalLM architecture). The base is only read; pickles are refused, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorad._fileio import open_regular
from lorad.engine.formats.safetensors_file import read_header
from lorad.errors import LoradError

PIPELINE, SINGLE_FILE, CAUSAL_LM = "pipeline", "single_file", "causal_lm"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Base:
    kind: str  # PIPELINE, SINGLE_FILE or CAUSAL_LM
    path: Path
    config: Path | None = None  # SINGLE_FILE: the diffusers config folder


def describe_base(path: Path, config: Path | None = None) -> Base:
    """Classify the base by its files; one clear LoradError when it is none of the three."""
    if not path.exists():
        raise LoradError(f"{path}: base model not found")
    if path.is_file():
        read_header(path)  # a pickle (.ckpt) or a broken file is refused here, never unpickled
        if config is None:
            raise LoradError(f"{path}: a single-file checkpoint needs --config FOLDER (a local diffusers "
                             "config folder with model_index.json, e.g. the model's repository without weights)")
        if not (config / "model_index.json").is_file():
            raise LoradError(f"{config}: not a diffusers config folder (no model_index.json)")
        return Base(SINGLE_FILE, path, config)
    if config is not None:
        raise LoradError(f"{path}: --config is for a single-file checkpoint; this base is a folder")
    if (path / "model_index.json").is_file():
        return Base(PIPELINE, path)
    if (path / "config.json").is_file():
        architectures = _json(path / "config.json").get("architectures") or []
        if any(str(a).endswith("ForCausalLM") for a in architectures):
            return Base(CAUSAL_LM, path)
        raise LoradError(f"{path}: a transformers model, but not a causal LM (architectures {architectures}); "
                         "lorad measures effects on diffusers pipelines and *ForCausalLM models")
    raise LoradError(f"{path}: not a base model lorad can load: neither a diffusers pipeline folder "
                     "(model_index.json) nor a transformers causal-LM folder (config.json)")


def _json(path: Path) -> dict:
    try:
        with open_regular(path) as f:
            doc = json.loads(f.read(1 << 22).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoradError(f"{path}: unreadable: {e}") from e
    return doc if isinstance(doc, dict) else {}


def base_sha256(base: Base) -> str:
    """sha256 over "name size sha256" lines of the base's files, sorted by name: the weights, configs
    and tokenizer files (every regular file; hidden ones, such as a hub cache's, left out). A single
    file is named by its file name, its config folder's files by "config/<name>"."""
    if base.kind == SINGLE_FILE:
        assert base.config is not None
        entries = [(base.path.name, base.path), *(("config/" + n, p) for n, p in _files(base.config))]
    else:
        entries = _files(base.path)
    digest = hashlib.sha256()
    for name, path in sorted(entries):
        size, file_hash = _file_sha256(path)
        digest.update(f"{name}\0{size}\0{file_hash}\n".encode())
    return digest.hexdigest()


def _files(folder: Path) -> list[tuple[str, Path]]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                out.append((path.relative_to(folder).as_posix(), path))
    return out


# A base is measured again and again (every variant, every job of one process); its files are many
# GB, so each file's hash is kept for as long as its size and mtime say it is the same file.
_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> tuple[int, str]:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open_regular(path) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return st.st_size, _HASHES[key]
