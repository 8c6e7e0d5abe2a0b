"""The control socket server: a Unix stream socket, one thread per connection, JSON lines.

Every connection's peer is identified by SO_PEERCRED (the kernel's word, not the client's); reads
are open to anyone who can open the socket (mode 0660), mutating methods need root, the daemon's
own uid or membership of the operator group. A socket file left by a dead daemon is detected by
dialling it before it is unlinked; a live one is never taken over.

Nothing a peer does may stop the accept loop, and idle connections may not lock anyone out:
- a caller who may not mutate holds at most PER_UID_CONNECTIONS; past that it is told `busy`;
- when all MAX_CONNECTIONS are taken, the longest-idle connection is closed to make room (one
  running a request is never closed; a reply that its peer does not read is not "running");
- callers who may mutate always get in: when every slot is running a request, they still get up
  to PRIVILEGED_EXTRA more.
`healthy()` dials the socket file and says hello, so a watchdog sees what a client would.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorad.daemon.control.protocol import (
    MAX_REQUEST_BYTES,
    Code,
    ControlError,
    MethodSpec,
    RequestError,
    encode_error,
    encode_request,
    encode_result,
    parse_request,
)
from lorad.errors import LoradError
from lorad.log import get_logger

log = get_logger("lorad.control")

MAX_CONNECTIONS = 32
PER_UID_CONNECTIONS = 8
PRIVILEGED_EXTRA = 32
IDLE_TIMEOUT = 300.0
SEND_TIMEOUT = 30.0  # a peer that reads no reply for this long is dropped
HEALTH_TIMEOUT = 10.0
BUSY = encode_error(None, Code.BUSY, "too many connections; try again")
# accept() fails this way only when the listening socket itself is gone; anything else is passing
_LISTENER_GONE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


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
        return not spec.mutating or self.may_mutate(peer, groups)

    def may_mutate(self, peer: Peer, groups: Callable[[int], frozenset[int]] = peer_groups) -> bool:
        if peer.uid in (0, self.daemon_uid):
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


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: Peer
    privileged: bool
    idle_since: float = field(default_factory=time.monotonic)
    running: bool = False  # a method is running for it: never closed to make room
    evicted: bool = False


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
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._last_problem: str | None = None
        self._accept_warned = 0.0

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
                _hang_up(conn.sock)
        if self._thread:
            self._thread.join(timeout=5)
        self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass

    # health ------------------------------------------------------------------------------

    def healthy(self, timeout: float = HEALTH_TIMEOUT) -> bool:
        """Whether a client can reach us now: the accept thread runs, the socket file is still ours,
        and a hello sent through it is answered. Logs when that changes."""
        problem = self._problem(timeout)
        if problem != self._last_problem:
            if problem:
                log.error("control socket does not answer", path=str(self.path), problem=problem)
            else:
                log.info("control socket answers again", path=str(self.path))
            self._last_problem = problem
        return problem is None

    def _problem(self, timeout: float) -> str | None:
        if self._thread is None or not self._thread.is_alive():
            return "the accept thread is not running"
        try:
            if os.stat(self.path).st_ino != self._inode:
                return "the socket file was replaced"
        except OSError as e:
            return f"the socket file is gone ({e.strerror})"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                probe.settimeout(timeout)
                probe.connect(str(self.path))
                probe.sendall(encode_request("health", "hello"))
                reply = b""
                while b"\n" not in reply and (chunk := probe.recv(65536)):
                    reply += chunk
        except OSError as e:
            return f"a hello through the socket failed ({e.strerror or e})"
        try:
            answered = json.loads(reply.partition(b"\n")[0]).get("id") == "health"
        except (ValueError, AttributeError):
            answered = False
        return None if answered else "a hello through the socket got no answer"

    # connections -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno in _LISTENER_GONE:
                    log.error("the control socket cannot accept any more", error=str(e))
                    return
                self._accept_failed(e)
                continue
            try:
                self._take(sock)
            except Exception:  # noqa: BLE001 - one connection's trouble must not end the loop
                log.exception("could not take a control connection")
                sock.close()

    def _accept_failed(self, e: OSError) -> None:
        """Out of file descriptors or memory: it passes; wait a little rather than spin."""
        now = time.monotonic()
        if now - self._accept_warned > 60:
            log.warning("accepting a control connection failed; retrying", error=str(e))
            self._accept_warned = now
        time.sleep(0.1)

    def _take(self, sock: socket.socket) -> None:
        peer = peer_of(sock)
        conn = self._admit(sock, peer, self._authorizer.may_mutate(peer))
        if conn is None:
            _refuse(sock)
            return
        try:
            threading.Thread(target=self._serve, args=(conn,), name="lorad-control-conn", daemon=True).start()
        except Exception:  # out of threads: give the slot back
            self._forget(conn)
            raise

    def _admit(self, sock: socket.socket, peer: Peer, privileged: bool) -> _Conn | None:
        """Register the connection, closing the longest-idle one when full; None: refuse it."""
        with self._lock:
            live = [c for c in self._conns if not c.evicted]
            if not privileged and sum(c.peer.uid == peer.uid for c in live) >= PER_UID_CONNECTIONS:
                return None
            if len(live) >= MAX_CONNECTIONS:
                idle = [c for c in live if not c.running]
                if idle:
                    oldest = min(idle, key=lambda c: c.idle_since)
                    oldest.evicted = True
                    _hang_up(oldest.sock)
                    log.info("closed the longest-idle control connection to make room", uid=oldest.peer.uid,
                             idle_s=round(time.monotonic() - oldest.idle_since, 1), for_uid=peer.uid)  # fmt: skip
                elif not privileged or len(live) >= MAX_CONNECTIONS + PRIVILEGED_EXTRA:
                    return None
            conn = _Conn(sock, peer, privileged)
            self._conns.add(conn)
            return conn

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        conn.sock.close()

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        try:
            sock.settimeout(IDLE_TIMEOUT)
            for line in self._lines(sock):
                with self._lock:
                    if conn.evicted:  # closed to make room just as this request came in
                        return
                    conn.running = True
                try:
                    reply = self.respond(line, conn.peer)
                finally:
                    with self._lock:
                        conn.running = False
                        conn.idle_since = time.monotonic()
                sock.settimeout(SEND_TIMEOUT)
                sock.sendall(reply)
                sock.settimeout(IDLE_TIMEOUT)
        except _TooLarge:
            _drain(sock)
        except OSError:
            pass
        except Exception:  # noqa: BLE001 - this connection ends; the server carries on
            log.exception("control connection failed")
        finally:
            self._forget(conn)

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


def _refuse(sock: socket.socket) -> None:
    """Say `busy` if the peer can take it at once, then hang up; the peer may already be gone."""
    try:
        sock.setblocking(False)
        sock.send(BUSY)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


def _hang_up(sock: socket.socket) -> None:
    """End a connection from another thread: its blocked recv() or sendall() returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
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
