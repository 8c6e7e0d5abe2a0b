"""How callers name a LoRA (its id, its watched path, or the path of its mirror) and the check that
keeps every operation on a path inside the watched folders.

Every part of the Library resolves what it is given through one `Refs`, so "not inside a watched
folder" and "not ingested" read the same whichever operation refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.orm import Session

from lorad._atomic import is_temp_name
from lorad.errors import StoreError
from lorad.library.db import repo
from lorad.library.db.models import Lora, Variant

LoraRef = int | str | os.PathLike[str]


class Refs:
    def __init__(self, roots: Sequence[Path], mirrors: Mapping[Path, Path]) -> None:
        """roots: the watched folders, resolved; mirrors: watched root -> mirror_to."""
        self.roots = tuple(roots)
        self.mirrors = mirrors

    def watched(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """The resolved path and the watched root it lies in; refuses anything else."""
        resolved = Path(path).expanduser().resolve()
        root = next((r for r in self.roots if resolved.is_relative_to(r) and resolved != r), None)
        if root is None:
            roots = ", ".join(str(r) for r in self.roots) or "none configured"
            raise StoreError(f"{path}: not inside a watched folder ({roots})")
        if is_temp_name(resolved):
            raise StoreError(f"{path}: is one of lorad's own temp files")
        return resolved, root

    def find_lora(self, s: Session, ref: LoraRef) -> Lora:
        if isinstance(ref, int):
            row = s.get(Lora, ref)
            if row is None:
                raise StoreError(f"no LoRA with id {ref}")
            return row
        path, _ = self.watched(self.unmirrored(ref))
        row = repo.lora_by_path(s, str(path))
        if row is None:
            raise StoreError(f"{path}: lorad has not ingested this file")
        return row

    def unmirrored(self, ref: str | os.PathLike[str]) -> str | os.PathLike[str]:
        """A path in a mirror names the watched file it mirrors (users type either)."""
        given = Path(os.path.abspath(ref))
        for root, to in self.mirrors.items():
            if to == given or to in given.parents:
                return root / given.relative_to(to)
        return ref

    @staticmethod
    def variant_of(s: Session, lora: Lora, variant_id: int | None) -> Variant:
        variant = s.get(Variant, variant_id) if variant_id is not None else None
        if variant is None or variant.lora_id != lora.id:
            raise StoreError(f"{lora.path}: has no variant {variant_id}")
        return variant
