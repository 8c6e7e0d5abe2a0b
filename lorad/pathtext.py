"""File names are bytes; lorad's records and logs are text. The two conversions between them.

Inside lorad a path is `os.fsdecode` text: bytes that are not UTF-8 become lone surrogates
(U+DC80..U+DCFF, "surrogateescape"), so `os.fsencode` gives back the exact bytes and every os call
works on it. Such text cannot be stored as it is (SQLite and PostgreSQL hold valid UTF-8 only) nor
printed, so:

- `to_column`/`from_column` (the database edge, see `lorad.library.db.models.PathText`): a path whose bytes
  are valid UTF-8 is stored unchanged, which is every path lorad recorded before this scheme. Any
  other is stored as `bytes:` + the text with each undecodable byte written `\\xHH` and each
  backslash doubled. A stored path is absolute, so real ones never begin with `bytes:`; a text
  that does anyway is escaped too, so the mapping stays one to one and reverses exactly.
- `shown`: for logs and messages only (not reversible): undecodable bytes as `\\xHH`, as `ls -b`.
"""

from __future__ import annotations

import os
import re

ESCAPED_PREFIX = "bytes:"
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def shown(path: str | os.PathLike[str]) -> str:
    """A printable form of a path: valid UTF-8 as it is, any other byte as \\xHH."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def to_column(text: str) -> str:
    """`os.fsdecode` text -> what the database stores (valid UTF-8 whatever the file name)."""
    if not text.startswith(ESCAPED_PREFIX) and _is_utf8(text):
        return text
    return escaped_column(text)


def escaped_column(text: str) -> str:
    """`text` in the escaped form `to_column` gives a name that is not UTF-8 (whatever `text` is):
    what a stored path beginning with `text` begins with, when it is stored escaped."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif "\ud800" <= ch <= "\udfff":
            raise ValueError(f"{shown(text)!r} holds a lone surrogate that stands for no file-name byte")
        else:
            out.append(ch)
    return ESCAPED_PREFIX + "".join(out)


def from_column(stored: str) -> str:
    """What the database stores -> the `os.fsdecode` text it was made from."""
    if not stored.startswith(ESCAPED_PREFIX):
        return stored
    body = stored[len(ESCAPED_PREFIX) :]

    def unescape(m: re.Match[str]) -> str:
        code = m.group(1)
        return "\\" if code == "\\" else chr(0xDC00 + int(code[1:], 16))

    return _ESCAPE.sub(unescape, body)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
