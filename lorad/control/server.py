"""The control socket server: a Unix stream socket, one thread per connection, JSON lines.

Every connection's peer is identified by SO_PEERCRED (the kernel's word, not the client's); reads
are open to anyone who can open the socket (mode 0660), mutating methods need root, the daemon's
own uid or membership of the operator group. A socket file left by a dead daemon is detected by
dialling it before it is unlinked; a live one is never taken over.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad.control.protocol import (
    MAX_REQUEST_BYTES,
    Code,
    ControlError,
    MethodSpec,
    RequestError,
    encode_error,
    encode_result,
    parse_request,
)
from lorad.errors import LoradError
from lorad.log import get_logger

log = get_logger("lorad.control")

MAX_CONNECTIONS = 32
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def actor(self) -> str:
        return f"cli:uid={self.uid},pid={self.pid}"


Handler = Callable[[dict[str, Any], Peer], Any]


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def peer_groups(pid: int) -> frozenset[int]:
    """The peer's supplementary groups, from /proc (empty when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass(frozen=True)
class Authorizer:
    """Who may call mutating methods: root, the daemon's uid, the operator group's members."""

    daemon_uid: int
    operator_gid: int | None = None

    def may_call(self, peer: Peer, spec: MethodSpec, groups: Callable[[int], frozenset[int]] = peer_groups) -> bool:
        if not spec.mutating or peer.uid in (0, self.daemon_uid):
            return True
        if self.operator_gid is None:
            return False
        return peer.gid == self.operator_gid or self.operator_gid in groups(peer.pid)


def group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise LoradError(f"operator_group {name!r} does not exist") from None


def claim_socket_path(path: Path) -> None:
    """Make `path` free for a new socket: unlink a stale socket, refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LoradError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing a stale control socket", path=str(path))
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise LoradError(f"cannot tell whether {path} is in use ({e.strerror or e}); remove it if no lorad runs") from e
    finally:
        probe.close()
    raise LoradError(f"another lorad daemon is already listening on {path}")


class ControlServer:
    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        authorizer: Authorizer,
        group: int | None = None,
        mode: int = 0o660,
        max_request: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._authorizer = authorizer
        self._group = group
        self._mode = mode
        self._max_request = max_request
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()

    # life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        claim_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # never exists with wider permissions than 0600, even briefly
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        if self._group is not None:
            try:
                os.chown(self.path, -1, self._group)
            except OSError as e:
                log.warning("cannot give the socket to the operator group", path=str(self.path), error=str(e))
        os.chmod(self.path, self._mode)
        sock.listen(64)
        self._inode = os.stat(self.path).st_ino
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="lorad-control", daemon=True)
        self._thread.start()
        log.info("control socket listening", path=str(self.path), mode=oct(self._mode))

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread:
            self._thread.join(timeout=5)
        self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass

    # connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                conn.sendall(encode_error(None, Code.REFUSED, "too many connections; try again"))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="lorad-control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            conn.settimeout(IDLE_TIMEOUT)
            peer = peer_of(conn)
            for line in self._lines(conn):
                conn.sendall(self.respond(line, peer))
        except _TooLarge:
            _drain(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _lines(self, conn: socket.socket):  # type: ignore[no-untyped-def]
        """Complete request lines; an over-long line is answered with an error and ends the connection."""
        buf = b""
        while True:
            newline = buf.find(b"\n")
            if newline >= 0:
                line, buf = buf[:newline], buf[newline + 1 :]
                if line.strip():
                    yield line
                continue
            if len(buf) > self._max_request:
                conn.sendall(encode_error(None, Code.TOO_LARGE, f"request is over {self._max_request} bytes"))
                raise _TooLarge
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk

    def respond(self, line: bytes, peer: Peer) -> bytes:
        """One reply line for one request line (never raises)."""
        rid = None
        try:
            request = parse_request(line)
            rid = request.id
            if not self._authorizer.may_call(peer, request.spec):
                raise ControlError(Code.FORBIDDEN, f"{request.method} needs root, the daemon's user or the operator group (you are uid {peer.uid})")
            handler = self._handlers.get(request.method)
            if handler is None:
                raise ControlError(Code.UNKNOWN_METHOD, f"{request.method} is not served by this daemon")
            return encode_result(rid, handler(request.params, peer))
        except RequestError as e:
            return encode_error(e.rid, e.code, e.message)
        except ControlError as e:
            return encode_error(rid, e.code, e.message)
        except LoradError as e:
            return encode_error(rid, Code.REFUSED, str(e))
        except Exception as e:  # noqa: BLE001 - the reply says so; the daemon carries on
            log.exception("control method failed", line=line[:200].decode(errors="replace"))
            return encode_error(rid, Code.INTERNAL, f"internal error: {type(e).__name__}: {e}")


class _TooLarge(Exception):
    pass


def _drain(conn: socket.socket, seconds: float = 1.0, limit: int = 16 << 20) -> None:
    """After refusing an oversized request: read and drop what the client is still sending, briefly.
    Closing with unread data would reset the connection and lose our error reply on its way."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(seconds)
        dropped = 0
        while dropped < limit and (chunk := conn.recv(65536)):
            dropped += len(chunk)
    except OSError:
        pass
