"""Watched folders: `WatchDir` (a folder, its policy, how it is watched, replace or mirror) and the
validation of the config's `watch` section, the mirror rules included.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad.daemon._config_values import _bool, _choice, _path
from lorad.daemon._config_yaml import _At, _kind, _mapping
from lorad.daemon.policies import DEFAULT_POLICY, Policy

WATCH_MODES = ("replace", "mirror")
_WATCH_KEYS = ("path", "recursive", "policy", "poll", "mode", "mirror_to")


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
