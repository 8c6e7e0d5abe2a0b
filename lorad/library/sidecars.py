"""Hashes that library managers' sidecar files beside a LoRA claim for it. Read, never written.

  ComfyUI-Lora-Manager  <stem>.metadata.json  {"sha256": "<hex>", "civitai": {<model version>}, ...}
  Civitai Helper        <stem>.civitai.info   the Civitai model version as its API returns it:
                                              {"files": [{"hashes": {"SHA256", "AutoV1", "AutoV2",
                                              "AutoV3", "BLAKE3", "CRC32"}, "primary": bool}], ...}
                                              (a top-level "hashes" object is read too)
  Stability Matrix      <stem>.cm-info.json   {"Hashes": {"SHA256", "CRC32", "BLAKE3"}, ...}

(<stem>: the LoRA's file name without `.safetensors`.) A Civitai model version lists every file of
the version (the model in other formats, training data), so only one entry of `files` describes
this file: the one that has one of the LoRA's own hashes (what the manager looked it up by), else
the one marked primary, else the only one.

The claims matter most when they no longer match the file (lorad replaced it with a reduction):
`lorad find` still leads from them to the LoRA. A sidecar that is not a regular file, is larger
than MAX_SIDECAR_BYTES, or is not JSON is skipped with a log line; its bytes are never changed
(opened read-only, lorad._fileio.open_regular: a FIFO there cannot block the caller).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from lorad._fileio import open_regular
from lorad.errors import LoradError
from lorad.library.hashes import CLAIM_LENGTHS, HEX
from lorad.pathtext import shown

log = structlog.get_logger()

SUFFIXES = (".metadata.json", ".civitai.info", ".cm-info.json")
MAX_SIDECAR_BYTES = 16 * 1024 * 1024  # a Civitai version with a long description and many images is < 1 MiB

# Civitai's key spellings -> lorad's kinds.
_CIVITAI_KINDS = {"sha256": "sha256", "autov1": "autov1", "autov2": "autov2", "autov3": "autov3",
                  "blake3": "blake3", "crc32": "crc32"}  # fmt: skip


@dataclass(frozen=True)
class Claim:
    kind: str  # a lorad.library.hashes.CLAIM_LENGTHS kind
    value: str  # lower-case hex
    source: str  # the sidecar's file name, as text (a name's undecodable bytes as \xHH)


def sidecar_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The sidecar names a LoRA at `path` may have (whether or not they exist)."""
    p = Path(path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
    return [p.with_name(stem + suffix) for suffix in SUFFIXES]


def read_claims(path: str | os.PathLike[str], own: Iterable[str] = ()) -> list[Claim]:
    """Every hash the sidecars beside the LoRA at `path` claim for it, in file order.

    own: the LoRA's own hashes (sha256, AutoV2...), to tell which of a Civitai version's files
    the sidecar was made for."""
    mine = {h.lower() for h in own}
    claims: list[Claim] = []
    for sidecar in sidecar_paths(path):
        doc = _load(sidecar)
        if doc is None:
            continue
        if sidecar.name.endswith(".metadata.json"):
            found = _lora_manager(doc, mine)
        elif sidecar.name.endswith(".civitai.info"):
            found = _civitai_version(doc, mine)
        else:
            found = _hash_map(doc.get("Hashes"))
        source = _printable(sidecar.name)
        seen = set()
        for kind, value in found:
            if (kind, value) not in seen:
                seen.add((kind, value))
                claims.append(Claim(kind, value, source))
    return claims


def _printable(name: str) -> str:
    """A file name as valid text for the records: os.fsdecode's lone surrogates (bytes that are
    not UTF-8) become \\xHH, as `ls -b` shows them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _load(sidecar: Path) -> dict[str, Any] | None:
    try:
        with open_regular(sidecar) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_SIDECAR_BYTES:
                log.warning("sidecar ignored: too large", path=shown(sidecar), bytes=size, limit=MAX_SIDECAR_BYTES)
                return None
            raw = f.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    except (OSError, LoradError) as e:
        log.warning("sidecar ignored: cannot read it", path=shown(sidecar), error=shown(str(e)))
        return None
    if len(raw) > MAX_SIDECAR_BYTES:  # grew while being read
        log.warning("sidecar ignored: too large", path=shown(sidecar), limit=MAX_SIDECAR_BYTES)
        return None
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        log.warning("sidecar ignored: not JSON", path=shown(sidecar), error=shown(str(e)[:200]))
        return None
    if not isinstance(doc, dict):
        log.warning("sidecar ignored: not a JSON object", path=shown(sidecar))
        return None
    return doc


def _hex(kind: str, value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if len(text) == CLAIM_LENGTHS[kind] and set(text) <= HEX else None


def _hash_map(hashes: object) -> Iterator[tuple[str, str]]:
    """(kind, value) of a {"SHA256": ..., "AutoV2": ...} object, in lorad's kinds; junk skipped."""
    if not isinstance(hashes, Mapping):
        return
    for key, value in hashes.items():
        kind = _CIVITAI_KINDS.get(str(key).lower())
        if kind is not None and (text := _hex(kind, value)) is not None:
            yield kind, text


def _civitai_version(doc: Mapping[str, Any], mine: set[str]) -> Iterator[tuple[str, str]]:
    yield from _hash_map(doc.get("hashes"))
    files = [f for f in doc.get("files") or [] if isinstance(f, Mapping)] if isinstance(doc.get("files"), list) else []
    chosen = _this_file(files, mine)
    if chosen is not None:
        yield from _hash_map(chosen.get("hashes"))


def _this_file(files: list[Mapping[str, Any]], mine: set[str]) -> Mapping[str, Any] | None:
    for f in files:
        if any(value in mine for _, value in _hash_map(f.get("hashes"))):
            return f
    primary = [f for f in files if f.get("primary") is True]
    if len(primary) == 1:
        return primary[0]
    return files[0] if len(files) == 1 else None


def _lora_manager(doc: Mapping[str, Any], mine: set[str]) -> Iterator[tuple[str, str]]:
    if (sha := _hex("sha256", doc.get("sha256"))) is not None:
        yield "sha256", sha
    civitai = doc.get("civitai")
    if isinstance(civitai, Mapping):
        yield from _civitai_version(civitai, mine | ({sha} if sha else set()))
