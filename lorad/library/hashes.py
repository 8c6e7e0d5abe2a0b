"""The identities users look a LoRA up by, and what a `find` query may say.

Every stored blob is recorded with (lorad.library.store hashes them in the one read that stores the bytes):
  sha256           of the whole file: the store's name for it; ComfyUI-Lora-Manager's identity
  AutoV2           sha256[:10]: what Civitai and A1111 show
  addnet / AutoV3  sha256 of the bytes after the safetensors header (A1111's "addnet" hash, kohya's
                   sshs_model_hash when the file's metadata is honest); AutoV3 is its first 12
  sshs_model_hash  as the file's own metadata claims it (and sshs_legacy_hash)
  BLAKE3           of the whole file: InvokeAI's model id
Sidecars beside a LoRA claim hashes for it too (lorad.library.sidecars); they are recorded per LoRA and
searchable, never trusted for anything else.

A query is hex, case-insensitive, at least MIN_PREFIX digits: a full hash or a prefix of one
(AutoV2 and AutoV3 are prefixes). It may carry an algorithm prefix as InvokeAI writes it
("blake3:<hex>") or as people paste it ("sha256:<hex>", "AutoV2: <hex>"): then only that kind
matches. An ambiguous prefix returns every match.

Blobs stored before lorad computed BLAKE3 have none until `lorad verify` re-reads them (verify
hashes every blob anyway, so the BLAKE3 costs no extra read); `find` says how many lack one.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorad.errors import LoradError

MIN_PREFIX = 8
HEX = frozenset("0123456789abcdef")

# Kinds of a hit on a stored blob.
BLOB_KINDS = ("sha256", "autov2", "addnet", "autov3", "sshs_model_hash", "sshs_legacy_hash", "blake3")
# Kinds a sidecar may claim, with the length of their hex value.
CLAIM_LENGTHS = {"sha256": 64, "blake3": 64, "autov1": 8, "autov2": 10, "autov3": 12, "crc32": 8}

# An algorithm prefix on a query -> the kinds it may match (blob kinds and claim kinds alike).
_PREFIXES = {
    "sha256": {"sha256", "autov2"},
    "autov2": {"autov2", "sha256"},
    "blake3": {"blake3"},
    "blake3_single": {"blake3"},
    "blake3_multi": {"blake3"},
    "autov3": {"autov3", "addnet"},
    "addnet": {"addnet", "autov3"},
    "sshs_model_hash": {"sshs_model_hash"},
    "autov1": {"autov1"},
    "crc32": {"crc32"},
}


class HashQueryError(LoradError):
    """A `find` query that names no hash (too short, not hex)."""


@dataclass(frozen=True)
class Query:
    prefix: str  # lower-case hex
    kinds: frozenset[str] | None = None  # only these kinds match (an algorithm prefix said so)

    def allows(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


def parse_query(text: str) -> Query:
    """The hex prefix a user's text names, and the kinds it may match; HashQueryError if none."""
    raw = text.strip().lower()
    kinds = None
    algo, sep, rest = raw.partition(":")
    if sep:
        if algo.strip() not in _PREFIXES:
            known = ", ".join(sorted(_PREFIXES))
            raise HashQueryError(f"{text!r}: unknown hash kind {algo.strip()!r} (known: {known})")
        kinds, raw = frozenset(_PREFIXES[algo.strip()]), rest.strip()
    raw = raw.removeprefix("0x")
    if not raw or not set(raw) <= HEX:
        raise HashQueryError(f"{text!r} is not a hex hash (sha256, AutoV2, AutoV3, sshs_model_hash, BLAKE3)")
    if len(raw) < MIN_PREFIX:
        raise HashQueryError(f"{text!r} is too short: give at least {MIN_PREFIX} hex digits")
    if len(raw) > 64:
        raise HashQueryError(f"{text!r} is longer than any hash lorad knows (64 hex digits)")
    return Query(raw, kinds)


def blob_kind(column: str, prefix: str) -> str:
    """What to call a match of `prefix` on a blob column or a claim's kind: AutoV2 and AutoV3 are
    the prefixes of sha256 and addnet that Civitai shows, at their lengths."""
    if column == "sha256" and len(prefix) == 10:
        return "autov2"
    if column == "addnet" and len(prefix) == 12:
        return "autov3"
    return column


@dataclass(frozen=True)
class HashHit:
    kind: str  # a BLOB_KINDS kind, or for a claim the kind the sidecar gave (CLAIM_LENGTHS)
    value: str  # the whole recorded value that the query is a prefix of
    blob_sha256: str | None = None  # the stored blob it names (a claim: the one it resolves to, if any)
    lora_id: int | None = None  # a claim's LoRA
    source: str | None = None  # a claim's sidecar (file name); None: lorad's own hash of the bytes

    @property
    def claimed(self) -> bool:
        return self.source is not None

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "value": self.value, "claimed": self.claimed, "source": self.source}


def claim_names(kind: str, value: str, sha256: str, data_sha256: str, blake3: str | None) -> bool:
    """Whether a claimed hash names the blob with these identities (CRC32 and AutoV1 cannot be
    told without re-reading the bytes: they never resolve)."""
    if kind == "sha256":
        return value == sha256
    if kind == "autov2":
        return sha256.startswith(value)
    if kind == "autov3":
        return bool(data_sha256) and data_sha256.startswith(value)
    if kind == "blake3":
        return blake3 is not None and value == blake3
    return False
