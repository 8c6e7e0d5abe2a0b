"""Protocol v1: one JSON object per line, both ways. Pure functions over bytes and plain data.

Request:  {"v": 1, "id": 7, "method": "list", "params": {}}
Result:   {"id": 7, "result": ...}
Error:    {"id": 7, "error": {"code": "outside_watch", "message": "..."}}

Each method's parameters are described as data (`METHODS`), so validation, authorisation (which
methods mutate) and the client share one table.

Hostile input is refused before it reaches a method, each with its own code, never `internal`:
- a line is UTF-8 (else `bad_json`), at most MAX_REQUEST_BYTES (`too_large`) and at most
  MAX_DEPTH brackets deep (`bad_request`; checked before parsing, so deep nesting costs nothing);
- ids and integer params are signed 64-bit (what SQLite stores), string ids at most MAX_ID_CHARS:
  a bad id is `bad_request` answered with id null, a bad param is `bad_params` naming it.

Paths travel as JSON strings. A file name that is not UTF-8 travels as `os.fsdecode(raw_bytes)`:
its undecodable bytes become lone surrogates U+DC80..U+DCFF (surrogateescape), which JSON escapes
as "\\udcff". The daemon takes such a string to mean `os.fsencode(string)`, the very bytes the
os module uses for it, so the file named is exactly the one the client saw. A path param that
`os.fsencode` rejects (any other lone surrogate), longer than PATH_MAX or with a name longer
than NAME_MAX bytes is `bad_params`. Both sides write JSON in ASCII, so any string survives.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from lorad.errors import LoradError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # a request is a method name and a few short params
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 8  # a request is two deep ({"params": {...}}); only record_effect's `effect` is a container
MAX_ID_CHARS = 128
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
PATH_MAX, NAME_MAX = 4096, 255  # Linux's limits in bytes: past them every syscall fails anyway
# `list` answers a page of at most this many LoRAs (under 2 MB of JSON) and the cursor of the
# next, so no reply grows with the library; a client follows `next` until it is null.
LIST_PAGE = 2000
LIST_STATES = ("original", "reduced", "refused")  # as lorad.library.listing has them
LIST_SORTS = ("name", "saved", "size", "date")


class Code:
    """Error codes a client can branch on."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_METHOD = "unknown_method"
    BAD_PARAMS = "bad_params"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    OUTSIDE_WATCH = "outside_watch"
    CONFLICT = "conflict"
    REFUSED = "refused"  # a LoradError: the operation cannot be done as asked
    BUSY = "busy"  # too many connections: try again (a connection-level reply, id null)
    INTERNAL = "internal"


class ControlError(LoradError):
    """An error reply (raised by handlers on the server, re-raised by the client)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    type: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    path: bool = False  # a string here names a file: see the module docstring
    choices: tuple[str, ...] = ()  # the values a string may take (none given: any)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mutating: bool
    summary: str
    params: tuple[Param, ...] = ()


def _spec(name: str, mutating: bool, summary: str, *params: Param) -> tuple[str, MethodSpec]:
    return name, MethodSpec(name, mutating, summary, params)


METHODS: dict[str, MethodSpec] = dict(
    [
        _spec("hello", False, "protocol and daemon version"),
        _spec("status", False, "queue depth, the running job, device, space saved"),
        _spec(
            "list", False, f"watched LoRAs and their variants, a page of at most {LIST_PAGE} at a time: "
            "folder, policy, state (original|reduced|refused) filter, sort is name|saved|size|date, "
            "after is the `next` of the page before; brief: each LoRA as the table shows it (sizes, the active "
            "variant, how many variants) instead of with all its variants",
            Param("folder", str, path=True), Param("policy", str), Param("state", str, choices=LIST_STATES),
            Param("sort", str, default="name", choices=LIST_SORTS), Param("after", str), Param("limit", int),
            Param("brief", bool, default=False),
        ),  # fmt: skip
        _spec("show", False, "one LoRA by path or id", Param("target", (str, int), required=True, path=True)),
        _spec("find", False, "the LoRAs and variants a hash names (sha256 or a prefix, AutoV2, AutoV3, "
              "sshs_model_hash, BLAKE3, or a sidecar's claim)", Param("hash", str, required=True)),
        _spec(
            "report", False, "the document of an HTML report: one LoRA (target) or the library (all)",
            Param("target", (str, int), path=True), Param("all", bool, default=False),
        ),  # fmt: skip
        _spec("revert", True, "put the original back at its path", Param("path", str, required=True, path=True)),
        _spec(
            "switch", True, "make a variant the file at its path",
            Param("path", str, required=True, path=True), Param("variant", int, required=True),
        ),  # fmt: skip
        _spec(
            "reduce", True, "enqueue a watched file now, optionally under another policy",
            Param("path", str, required=True, path=True), Param("policy", str),
        ),  # fmt: skip
        _spec(
            "effect_files", True, "the stored files `lorad effect` compares: a variant (default: the active "
            "one, else the newest reduction) and the variant it was made from, as store paths to read (an "
            "adapter folder: its files); needs the permission record_effect needs, so it is asked first",
            Param("target", (str, int), required=True, path=True), Param("variant", int),
        ),  # fmt: skip
        _spec(
            "record_effect", True, "record a variant's measured effect on a base model (the JSON of "
            "lorad.engine.effect.EffectResult, with the variant it was compared with as reference)",
            Param("target", (str, int), required=True, path=True), Param("variant", int, required=True),
            Param("reference", int), Param("effect", dict, required=True),
        ),  # fmt: skip
        _spec("pause", True, "stop starting new jobs"),
        _spec("resume", True, "start jobs again; ends a pause and a drain"),
        _spec("drain", True, "finish the running jobs, claim no more, give up this node's watched folders "
              "(another node takes them), mark the node draining; `resume` ends it"),
        _spec("rescan", True, "reconcile every watched folder now"),
        _spec("verify", True, "re-hash the store and the watched files"),
        _spec("gc", True, "collect unreferenced reduced blobs", Param("dry_run", bool, default=True)),
    ]
)


@dataclass(frozen=True)
class Request:
    id: int | str | None
    method: str
    params: dict[str, Any]

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]


def parse_request(line: bytes, methods: dict[str, MethodSpec] = METHODS) -> Request:
    """Decode and validate one request line; raise ControlError (with the id when known)."""
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(None, Code.TOO_LARGE, f"request is over {MAX_REQUEST_BYTES} bytes")
    try:
        text = line.decode("utf-8")  # strict: json.loads(bytes) would let encoded surrogates through
    except UnicodeDecodeError as e:
        raise RequestError(None, Code.BAD_JSON, f"request is not UTF-8: {e}") from None
    if _deeper_than(text, MAX_DEPTH):
        raise RequestError(None, Code.BAD_REQUEST, f"request is nested more than {MAX_DEPTH} deep")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(None, Code.BAD_JSON, f"request is not JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # a number past Python's int-string limit
        raise RequestError(None, Code.BAD_REQUEST, f"request holds an unreadable value: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(None, Code.BAD_REQUEST, "request must be a JSON object")
    rid = doc.get("id")
    if rid is not None and not _valid_id(rid):
        raise RequestError(None, Code.BAD_REQUEST, f"id must be a 64-bit integer or a string of at most {MAX_ID_CHARS} characters")
    unknown = set(doc) - {"v", "id", "method", "params"}
    if unknown:
        raise RequestError(rid, Code.BAD_REQUEST, f"unknown request fields: {', '.join(sorted(unknown))}")
    if doc.get("v") != VERSION:
        raise RequestError(rid, Code.UNSUPPORTED_VERSION, f"protocol version {doc.get('v')!r} is not supported; this daemon speaks v{VERSION}")
    method = doc.get("method")
    if not isinstance(method, str) or method not in methods:
        raise RequestError(rid, Code.UNKNOWN_METHOD, f"unknown method {method!r}; known: {', '.join(methods)}")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise RequestError(rid, Code.BAD_PARAMS, "params must be a JSON object")
    return Request(rid, method, validate_params(methods[method], params, rid))


class RequestError(ControlError):
    """A request that could not be parsed or validated; carries the id to answer with."""

    def __init__(self, rid: int | str | None, code: str, message: str) -> None:
        super().__init__(code, message)
        self.rid = rid


def validate_params(spec: MethodSpec, params: dict[str, Any], rid: int | str | None = None) -> dict[str, Any]:
    known = {p.name: p for p in spec.params}
    for name in params:
        if name not in known:
            allowed = ", ".join(known) or "none"
            raise RequestError(rid, Code.BAD_PARAMS, f"{spec.name}: unknown param {name!r} (allowed: {allowed})")
    clean: dict[str, Any] = {}
    for p in spec.params:
        if p.name not in params or params[p.name] is None:
            if p.required:
                raise RequestError(rid, Code.BAD_PARAMS, f"{spec.name}: param {p.name!r} is required")
            clean[p.name] = p.default
            continue
        value = params[p.name]
        types = p.type if isinstance(p.type, tuple) else (p.type,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise RequestError(rid, Code.BAD_PARAMS, f"{spec.name}: param {p.name!r} must be {names}, got {type(value).__name__}")
        problem = _int_problem(value) if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str):
            problem = _path_problem(value) if p.path else _text_problem(value)
            if not problem and p.choices and value not in p.choices:
                problem = f"must be one of {', '.join(p.choices)}, got {value!r}"
        if problem:
            raise RequestError(rid, Code.BAD_PARAMS, f"{spec.name}: param {p.name!r} {problem}")
        clean[p.name] = value
    return clean


def _int_problem(value: int) -> str | None:
    return None if INT_MIN <= value <= INT_MAX else "is out of range (a signed 64-bit integer)"


def _text_problem(value: str) -> str | None:
    if "\0" in value or not value.strip():
        return "must be a non-empty string"
    if any("\ud800" <= c <= "\udfff" for c in value):
        return "holds a lone surrogate (not a character)"
    return None


def _path_problem(value: str) -> str | None:
    if "\0" in value or not value.strip():
        return "must be a non-empty string"
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        return "holds a lone surrogate that is not an escaped byte (see os.fsdecode)"
    if len(raw) >= PATH_MAX or any(len(name) > NAME_MAX for name in raw.split(b"/")):
        return f"is too long (a path is under {PATH_MAX} bytes, a name at most {NAME_MAX})"
    return None


def _valid_id(rid: object) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return INT_MIN <= rid <= INT_MAX
    return isinstance(rid, str) and len(rid) <= MAX_ID_CHARS


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def _deeper_than(text: str, limit: int) -> bool:
    """Whether brackets nest deeper than `limit` outside strings (malformed JSON may count wrong;
    the parser refuses it anyway)."""
    depth = 0
    for c in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > limit:
            return True
    return False


def encode_request(rid: int | str, method: str, params: dict[str, Any] | None = None) -> bytes:
    return _line({"v": VERSION, "id": rid, "method": method, "params": params or {}})


def encode_result(rid: int | str | None, result: Any) -> bytes:
    return _line({"id": rid, "result": result})


def encode_error(rid: int | str | None, code: str, message: str) -> bytes:
    return _line({"id": rid, "error": {"code": code, "message": message}})


def decode_response(line: bytes, rid: int | str) -> Any:
    """The result of a reply line, or raise the ControlError it carries."""
    try:
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(Code.BAD_JSON, f"the daemon sent a reply that is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ControlError(Code.BAD_REQUEST, "the daemon's reply is not a JSON object")
    if doc.get("id") != rid and not (doc.get("id") is None and "error" in doc):  # id null: about the connection
        raise ControlError(Code.BAD_REQUEST, f"the daemon answered request {doc.get('id')!r}, not {rid!r}")
    if "error" in doc:
        err = doc["error"] if isinstance(doc["error"], dict) else {}
        raise ControlError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "unknown error")))
    return doc.get("result")


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, default=str, separators=(",", ":")).encode() + b"\n"  # ASCII: lone surrogates too
