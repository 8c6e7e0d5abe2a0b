"""Protocol v1: one JSON object per line, both ways. Pure functions over bytes and plain data.

Request:  {"v": 1, "id": 7, "method": "list", "params": {}}
Result:   {"id": 7, "result": ...}
Error:    {"id": 7, "error": {"code": "outside_watch", "message": "..."}}

Each method's parameters are described as data (`METHODS`), so validation, authorisation (which
methods mutate) and the client share one table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorad.errors import LoradError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # a request is a method name and a few short params
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


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
        _spec("list", False, "watched LoRAs and their variants", Param("folder", str)),
        _spec("show", False, "one LoRA by path or id", Param("target", (str, int), required=True)),
        _spec("revert", True, "put the original back at its path", Param("path", str, required=True)),
        _spec(
            "switch", True, "make a variant the file at its path",
            Param("path", str, required=True), Param("variant", int, required=True),
        ),  # fmt: skip
        _spec(
            "reduce", True, "enqueue a watched file now, optionally under another policy",
            Param("path", str, required=True), Param("policy", str),
        ),  # fmt: skip
        _spec("pause", True, "stop starting new jobs"),
        _spec("resume", True, "start jobs again"),
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
        doc = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(None, Code.BAD_JSON, f"request is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(None, Code.BAD_REQUEST, "request must be a JSON object")
    rid = doc.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
        raise RequestError(None, Code.BAD_REQUEST, "id must be a number or a string")
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
        if isinstance(value, str) and ("\0" in value or not value.strip()):
            raise RequestError(rid, Code.BAD_PARAMS, f"{spec.name}: param {p.name!r} must be a non-empty string")
        clean[p.name] = value
    return clean


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
    if not isinstance(doc, dict) or doc.get("id") != rid:
        raise ControlError(Code.BAD_REQUEST, f"the daemon answered another request: {str(doc)[:200]}")
    if "error" in doc:
        err = doc["error"] if isinstance(doc["error"], dict) else {}
        raise ControlError(str(err.get("code", Code.INTERNAL)), str(err.get("message", "unknown error")))
    return doc.get("result")


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, default=str, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
