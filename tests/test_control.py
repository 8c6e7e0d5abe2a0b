"""Control plane: protocol v1 as pure functions, and a real server on a real Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorad.daemon.control.client import Client, DaemonNotRunning
from lorad.daemon.control.protocol import (
    MAX_REQUEST_BYTES,
    METHODS,
    Code,
    ControlError,
    decode_response,
    encode_request,
    encode_result,
    parse_request,
)
from lorad.daemon.control.server import Authorizer, ControlServer, Peer, claim_socket_path
from lorad.errors import LoradError
from tests._daemon_fixtures import wait_for

# ---------------------------------------------------------------------------------------------
# Protocol


def test_a_valid_request_parses_with_defaults_filled() -> None:
    req = parse_request(b'{"v":1,"id":7,"method":"gc","params":{}}')
    assert (req.id, req.method, req.params) == (7, "gc", {"dry_run": True})
    assert req.spec.mutating
    assert parse_request(encode_request("a", "switch", {"path": "/x", "variant": 3})).params == {"path": "/x", "variant": 3}


@pytest.mark.parametrize(
    ("line", "code", "rid"),
    [
        (b"{not json", Code.BAD_JSON, None),
        (b"[1, 2]", Code.BAD_REQUEST, None),
        (b'{"v":1,"id":true,"method":"list"}', Code.BAD_REQUEST, None),
        (b'{"v":1,"id":1,"method":"list","extra":1}', Code.BAD_REQUEST, 1),
        (b'{"v":2,"id":2,"method":"list"}', Code.UNSUPPORTED_VERSION, 2),
        (b'{"id":3,"method":"list"}', Code.UNSUPPORTED_VERSION, 3),
        (b'{"v":1,"id":4,"method":"format_disk"}', Code.UNKNOWN_METHOD, 4),
        (b'{"v":1,"id":5,"method":"list","params":[]}', Code.BAD_PARAMS, 5),
        (b'{"v":1,"id":6,"method":"revert","params":{}}', Code.BAD_PARAMS, 6),
        (b'{"v":1,"id":7,"method":"revert","params":{"path":"/a","force":1}}', Code.BAD_PARAMS, 7),
        (b'{"v":1,"id":8,"method":"switch","params":{"path":"/a","variant":true}}', Code.BAD_PARAMS, 8),
        (b'{"v":1,"id":9,"method":"switch","params":{"path":"/a","variant":"2"}}', Code.BAD_PARAMS, 9),
        (b'{"v":1,"id":10,"method":"revert","params":{"path":"/a\\u0000b"}}', Code.BAD_PARAMS, 10),
        (b'{"v":1,"id":11,"method":"revert","params":{"path":"  "}}', Code.BAD_PARAMS, 11),
        # hostile lines (issue 10): each its own code, never `internal`
        (b'{"v":1,"id":12,"method":"list","params":{"folder":' + b"[" * 5000 + b"]" * 5000 + b"}}", Code.BAD_REQUEST, None),
        (b'{"v":1,"id":' + b"9" * 5000 + b',"method":"hello"}', Code.BAD_REQUEST, None),
        (b'{"v":1,"id":9223372036854775808,"method":"hello"}', Code.BAD_REQUEST, None),
        (b'{"v":1,"id":"' + b"x" * 129 + b'","method":"hello"}', Code.BAD_REQUEST, None),
        (b'{"v":1,"id":13,"method":"list","params":{"folder":"/w/\xff"}}', Code.BAD_JSON, None),
        (b'{"v":1,"id":14,"method":"list","params":{"folder":"/w/\xed\xa0\x80"}}', Code.BAD_JSON, None),
        (b'{"v":1,"id":15,"method":"switch","params":{"path":"/a","variant":-9223372036854775809}}', Code.BAD_PARAMS, 15),
        (b'{"v":1,"id":16,"method":"show","params":{"target":1000000000000000000000000}}', Code.BAD_PARAMS, 16),
        (b'{"v":1,"id":17,"method":"show","params":{"target":"/w/\\ud800"}}', Code.BAD_PARAMS, 17),
        (b'{"v":1,"id":18,"method":"reduce","params":{"path":"/w/a","policy":"\\udcff"}}', Code.BAD_PARAMS, 18),
        (b'{"v":1,"id":19,"method":"revert","params":{"path":"/w/' + b"a" * 256 + b'"}}', Code.BAD_PARAMS, 19),
    ],
)
def test_bad_requests_get_one_clear_error_code(line: bytes, code: str, rid: Any) -> None:
    with pytest.raises(ControlError) as err:
        parse_request(line)
    assert err.value.code == code
    assert getattr(err.value, "rid", None) == rid
    assert err.value.message


def test_limits_are_inclusive_and_brackets_in_strings_do_not_count() -> None:
    edge = parse_request(b'{"v":1,"id":-9223372036854775808,"method":"switch","params":{"path":"/w/[[[[[[[[[[.st","variant":9223372036854775807}}')
    assert (edge.id, edge.params["variant"], edge.params["path"]) == (-(2**63), 2**63 - 1, "/w/[[[[[[[[[[.st")


def test_a_non_utf8_file_name_travels_as_os_fsdecode_gives_it() -> None:
    name = os.fsdecode(b"/w/caf\xe9.safetensors")  # Latin-1 bytes on disk
    line = encode_request(1, "revert", {"path": name})
    assert line.isascii() and b"\\udce9" in line
    path = parse_request(line).params["path"]
    assert os.fsencode(path) == b"/w/caf\xe9.safetensors"


def test_oversized_requests_are_refused_before_parsing() -> None:
    line = encode_request(1, "revert", {"path": "x" * MAX_REQUEST_BYTES})
    with pytest.raises(ControlError) as err:
        parse_request(line)
    assert err.value.code == Code.TOO_LARGE


def test_responses_decode_to_results_or_raise_their_error() -> None:
    assert decode_response(encode_result(3, {"a": [1]}), 3) == {"a": [1]}
    with pytest.raises(ControlError) as err:
        decode_response(b'{"id":3,"error":{"code":"not_found","message":"no such LoRA"}}', 3)
    assert (err.value.code, err.value.message) == ("not_found", "no such LoRA")
    with pytest.raises(ControlError) as err:
        decode_response(encode_result(4, {"secret": 1}), 3)  # a reply to another request
    assert "secret" not in err.value.message
    with pytest.raises(ControlError) as err:  # about the connection, so it answers any request
        decode_response(b'{"id":null,"error":{"code":"busy","message":"too many connections; try again"}}', 3)
    assert err.value.code == Code.BUSY


def test_only_read_methods_are_open_to_everyone() -> None:
    readers = {name for name, spec in METHODS.items() if not spec.mutating}
    assert readers == {"hello", "status", "list", "show", "find", "report"}


def test_authorizer_rules() -> None:
    auth = Authorizer(daemon_uid=1000, operator_gid=50)
    revert, status = METHODS["revert"], METHODS["status"]
    no_groups = lambda _pid: frozenset()  # noqa: E731
    assert auth.may_call(Peer(1, 0, 0), revert, no_groups)  # root
    assert auth.may_call(Peer(1, 1000, 1000), revert, no_groups)  # the daemon's user
    assert auth.may_call(Peer(1, 2000, 50), revert, no_groups)  # operator as primary group
    assert auth.may_call(Peer(1, 2000, 2000), revert, lambda _pid: frozenset({50}))  # supplementary
    assert not auth.may_call(Peer(1, 2000, 2000), revert, no_groups)
    assert auth.may_call(Peer(1, 2000, 2000), status, no_groups)
    assert not Authorizer(daemon_uid=1000).may_call(Peer(1, 2000, 50), revert, no_groups)


# ---------------------------------------------------------------------------------------------
# A real server with a small method table


class Table:
    """Handlers standing in for the daemon's: they record what reached them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Peer]] = []

    def handlers(self) -> dict[str, Any]:
        def record(name: str, result: Any):  # type: ignore[no-untyped-def]
            def handler(params: dict[str, Any], peer: Peer) -> Any:
                self.calls.append((name, params, peer))
                return result(params) if callable(result) else result

            return handler

        def refuse(params: dict[str, Any], peer: Peer) -> Any:
            raise ControlError(Code.OUTSIDE_WATCH, f"{params['path']} is not inside a watched folder")

        def crash(params: dict[str, Any], peer: Peer) -> Any:
            raise ZeroDivisionError("boom")

        def lorad_error(params: dict[str, Any], peer: Peer) -> Any:
            raise LoradError("nothing to revert: already the original")

        return {
            "hello": record("hello", {"v": 1, "daemon": "test"}),
            "list": record("list", [{"path": "/w/a.safetensors", "id": 1}]),
            "switch": record("switch", lambda p: {"switched": p["variant"]}),
            "reduce": refuse,
            "verify": crash,
            "revert": lorad_error,
        }


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Outside pytest's 0700 tmp so that another uid can reach the socket in the peer tests.
    path = Path(tempfile.mkdtemp(prefix="lorad-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(sockdir: Path) -> Iterator[tuple[ControlServer, Table]]:
    table = Table()
    server = ControlServer(sockdir / "lorad.sock", table.handlers(), Authorizer(daemon_uid=os.getuid()))
    server.start()
    yield server, table
    server.stop()


def raw_call(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        try:
            s.sendall(b"".join(lines))
            s.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the server hung up on an oversized request; its reply is still readable
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_is_0660_and_serves_several_requests_per_connection(served) -> None:  # type: ignore[no-untyped-def]
    server, table = served
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    with Client(server.path) as client:
        assert client.call("hello") == {"v": 1, "daemon": "test"}
        assert client.call("list") == [{"path": "/w/a.safetensors", "id": 1}]
        assert client.call("switch", path="/w/a.safetensors", variant=2) == {"switched": 2}
    name, params, peer = table.calls[-1]
    assert (name, params) == ("switch", {"path": "/w/a.safetensors", "variant": 2})
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_handler_errors_become_error_replies_and_the_server_carries_on(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    with Client(server.path) as client:
        with pytest.raises(ControlError) as err:
            client.call("reduce", path="/etc/passwd")
        assert err.value.code == Code.OUTSIDE_WATCH and "/etc/passwd" in err.value.message
        with pytest.raises(ControlError) as err:
            client.call("verify")
        assert err.value.code == Code.INTERNAL and "ZeroDivisionError" in err.value.message
        with pytest.raises(ControlError) as err:
            client.call("revert", path="/w/a.safetensors")
        assert (err.value.code, err.value.message) == (Code.REFUSED, "nothing to revert: already the original")
        with pytest.raises(ControlError) as err:
            client.call("pause")  # a known method this table does not serve
        assert err.value.code == Code.UNKNOWN_METHOD
        assert client.call("hello")["v"] == 1


def test_malformed_lines_get_errors_on_the_same_connection(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    replies = raw_call(server.path, b"garbage\n", b'{"v":1,"id":2,"method":"nope"}\n', encode_request(3, "hello"))
    assert [r.get("error", {}).get("code") for r in replies] == [Code.BAD_JSON, Code.UNKNOWN_METHOD, None]
    assert replies[2] == {"id": 3, "result": {"v": 1, "daemon": "test"}}


def test_an_oversized_request_is_cut_off_without_harm(served) -> None:  # type: ignore[no-untyped-def]
    server, table = served
    huge = b'{"v":1,"id":1,"method":"list","params":{"folder":"' + b"x" * (MAX_REQUEST_BYTES * 4)
    replies = raw_call(server.path, huge)
    assert replies == [{"id": None, "error": {"code": Code.TOO_LARGE, "message": f"request is over {MAX_REQUEST_BYTES} bytes"}}]
    assert table.calls == []
    assert Client(server.path).call("hello")["daemon"] == "test"


def test_health_is_a_hello_through_the_socket_file(served) -> None:  # type: ignore[no-untyped-def]
    server, table = served
    assert server.healthy()
    assert table.calls[-1][0] == "hello"  # it went all the way through
    os.rename(server.path, server.path.with_suffix(".moved"))  # clients can no longer find it
    assert not server.healthy()
    os.rename(server.path.with_suffix(".moved"), server.path)
    assert server.healthy()


def test_a_broken_listener_ends_the_accept_loop_and_health_says_so(served) -> None:  # type: ignore[no-untyped-def]
    server, _ = served
    # Stands in for a listening socket that fails under the daemon: nothing a peer can do.
    server._sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not server._thread.is_alive(), 10, 0.05, "the accept loop to end rather than spin")
    assert not server.healthy()


def outsider() -> tuple[int, int]:
    """A uid/gid that is neither root nor the daemon's: `nobody` when we are root, else ourselves
    (then the server under test runs with daemon_uid=0, so we are the outsider)."""
    return (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())


def call_as(uid: int, gid: int, path: Path, line: bytes) -> dict[str, Any]:
    """One request from a process running as uid/gid (forked and demoted when we are root)."""
    if os.geteuid() != 0:
        return raw_call(path, line)[0]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the outsider, call, report, exit without cleanup
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.write(write_end, json.dumps(raw_call(path, line)[0]).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(write_end, json.dumps({"child_error": repr(e)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


@pytest.mark.parametrize("operator", [False, True])
def test_peer_credentials_decide_who_may_mutate(sockdir: Path, operator: bool) -> None:
    uid, gid = outsider()
    table = Table()
    auth = Authorizer(daemon_uid=0, operator_gid=gid if operator else None)
    server = ControlServer(sockdir / "lorad.sock", table.handlers(), auth, group=gid)
    server.start()
    try:
        read = call_as(uid, gid, server.path, encode_request(1, "list"))
        assert read == {"id": 1, "result": [{"path": "/w/a.safetensors", "id": 1}]}
        write = call_as(uid, gid, server.path, encode_request(2, "switch", {"path": "/w/a.safetensors", "variant": 1}))
        if operator:
            assert write == {"id": 2, "result": {"switched": 1}}
        else:
            assert write["error"]["code"] == Code.FORBIDDEN
            assert f"uid {uid}" in write["error"]["message"]
            assert [c[0] for c in table.calls] == ["list"]  # the refused call never reached a handler
        assert {c[2].uid for c in table.calls} == {uid}
    finally:
        server.stop()


def test_a_stale_socket_is_replaced_but_a_live_one_is_not(sockdir: Path) -> None:
    path = sockdir / "lorad.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a crashed daemon leaves its socket file behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    first = ControlServer(path, Table().handlers(), Authorizer(os.getuid()))
    first.start()
    try:
        assert Client(path).call("hello")["v"] == 1
        second = ControlServer(path, Table().handlers(), Authorizer(os.getuid()))
        with pytest.raises(LoradError, match="already listening"):
            second.start()
        assert Client(path).call("hello")["v"] == 1  # the live daemon kept its socket
    finally:
        first.stop()
    assert not path.exists()  # a clean stop removes its own socket


def test_a_regular_file_at_the_socket_path_is_never_removed(sockdir: Path) -> None:
    path = sockdir / "lorad.sock"
    path.write_text("precious")
    with pytest.raises(LoradError, match="not a socket"):
        claim_socket_path(path)
    assert path.read_text() == "precious"


def test_client_says_clearly_when_the_daemon_is_not_running(sockdir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="not running"):
        Client(sockdir / "absent.sock").call("status")


def test_clients_find_the_socket_flag_then_config_then_env_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from lorad.cli.control import socket_path
    from lorad.daemon.config import default_socket_candidates

    config = tmp_path / "c.yaml"
    config.write_text(f"socket: {tmp_path / 'from-config.sock'}\n")
    monkeypatch.setenv("LORAD_SOCKET", str(tmp_path / "from-env.sock"))
    args = argparse.Namespace(socket=tmp_path / "flag.sock", config=config)
    assert socket_path(args) == tmp_path / "flag.sock"
    args.socket = None
    assert socket_path(args) == tmp_path / "from-config.sock"
    args.config = None
    assert socket_path(args) == tmp_path / "from-env.sock"
    monkeypatch.delenv("LORAD_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert socket_path(args) in default_socket_candidates()
