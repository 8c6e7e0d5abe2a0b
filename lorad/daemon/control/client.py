"""The control socket client: one connection, one request line, one reply line per call."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path
from typing import Any

from lorad.daemon.control.protocol import MAX_RESPONSE_BYTES, Code, ControlError, decode_response, encode_request
from lorad.errors import LoradError

BACKLOG_WAIT = 10.0


class DaemonNotRunning(LoradError):
    """Nothing answers on the socket."""


class Client:
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            self._dial(sock)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            sock.close()
            raise DaemonNotRunning(
                f"the lorad daemon is not running (nothing listens on {self.path}); "
                "start it with `lorad daemon` or `systemctl start lorad`"
            ) from e
        except PermissionError as e:
            sock.close()
            raise LoradError(f"no permission to open {self.path}; ask to join the lorad operator group") from e
        self._sock = sock

    def _dial(self, sock: socket.socket) -> None:
        """Connect, waiting a while when the daemon's backlog is full (a flood of connections)."""
        deadline = time.monotonic() + min(self.timeout, BACKLOG_WAIT)
        while True:
            try:
                sock.connect(str(self.path))
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise ControlError(Code.BUSY, "too many connections are waiting; try again") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, method: str, **params: Any) -> Any:
        """Send one request and return its result; an error reply raises ControlError."""
        self.connect()
        assert self._sock is not None
        rid = next(self._ids)
        request = encode_request(rid, method, {k: v for k, v in params.items() if v is not None})
        try:
            try:
                self._sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused on connecting (busy): its one-line reason is still there to read
            line = self._read_line()
        except TimeoutError as e:
            raise LoradError(f"the daemon did not answer {method} within {self.timeout:.0f}s") from e
        except OSError as e:
            raise DaemonNotRunning(f"the daemon closed the connection ({e.strerror or e})") from e
        return decode_response(line, rid)

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise DaemonNotRunning("the daemon closed the connection without answering")
            self._buf += chunk
            if len(self._buf) > MAX_RESPONSE_BYTES:
                raise ControlError("too_large", "the daemon's reply is too large")
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def call(path: Path, method: str, **params: Any) -> Any:
    with Client(path) as client:
        return client.call(method, **params)
