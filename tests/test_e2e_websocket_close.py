"""A WebSocket the service closes (1009, 1008) is closed for good, also when the client had more
frames on the way: the real server (hypercorn on loopback), a raw socket as the client."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import anyio
import pytest

from tests.e2e import (  # noqa: F401  (fixtures)
    ServerProcess,
    dump_server_logs_on_failure,
    fake_upstream,
    running_service,
)

_TCP_STATES = {"01": "ESTAB", "08": "CLOSE-WAIT"}  # the states of a socket still open (/proc/net/tcp)


@pytest.fixture(scope="module")
def small_body_service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:  # noqa: F811
    # No pings (WS_PING_SECONDS=0): the raw client reads the server's bytes in order, its close frame first.
    with running_service(fake_upstream.url, name="ws-close", MAX_BODY_BYTES="1000", WS_PING_SECONDS="0") as server:
        yield server


def _handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _client_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _server_sockets(port: int, client_port: int) -> list[str]:
    """The states of the service's side of the connection from `client_port` (no `ss` needed)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, remote, state = line.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                states.append(_TCP_STATES.get(state, state))
    return states


def _read_until_eof(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if data.startswith(b"\x88") and len(data) >= 2 + (data[1] & 0x7F):
                # The server's close frame: answer it, as RFC 6455 asks (and every client library does).
                sock.sendall(_client_frame(0x8, data[2:4]))
        return data, True
    except TimeoutError:
        return data, False


async def closed_with_1009(service: ServerProcess, frames: bytes) -> bytes:
    """What the service sends after `frames` on a new socket: it must close with 1009 and then
    end the connection (the client answers the close), leaving no socket of its own open."""
    sock = _handshake(service.port)
    client_port = sock.getsockname()[1]
    try:
        sock.sendall(frames)
        data, eof = await anyio.to_thread.run_sync(_read_until_eof, sock, 3.0)
        assert data.startswith(b"\x88") and int.from_bytes(data[2:4], "big") == 1009, data[:20]
        assert eof, "the service sent its close frame (1009) but never closed the connection"
    finally:
        sock.close()
    await anyio.sleep(1.0)
    states = _server_sockets(service.port, client_port)
    assert not {"ESTAB", "CLOSE-WAIT"} & set(states), f"the server's socket is left open: {states}"
    return data


@pytest.mark.anyio
async def test_frames_pipelined_after_an_oversized_one_do_not_leave_the_socket_open_for_good(
    small_body_service: ServerProcess,
) -> None:
    """A client sends a frame over MAX_BODY_BYTES and, in the same write, more frames (a client
    flushing its queue after a reconnect). The service closes with 1009 and keeps taking (and
    dropping) the client's frames until its answer: had it stopped, hypercorn's per-connection
    queue (10 messages) would fill, its `websocket.disconnect` put after the app returned would
    block for good, and the TCP connection would stay open (CLOSE-WAIT once the client left)."""
    await closed_with_1009(small_body_service,
                           _client_frame(0x1, b"x" * 2000) + b"".join(_client_frame(0x1, b"not json") for _ in range(30)))


@pytest.mark.anyio
async def test_a_message_over_twice_the_limit_is_refused_before_it_ends_and_the_socket_still_closes(
    small_body_service: ServerProcess,
) -> None:
    """hypercorn holds a message until its end before the app sees it: up to 16 Mi characters
    (64 MiB) per socket by default. hypercorn_config.py sets twice MAX_BODY_BYTES, so hypercorn
    refuses a message past that (1009) while it is still coming, and (assistant/hypercorn_mends.py)
    reads on past it, more frames included, until the client answers the close; hypercorn 0.18
    stopped reading there and kept the socket for good."""
    def fragment(opcode: int, payload: bytes) -> bytes:  # FIN not set: the message goes on
        frame = _client_frame(opcode, payload)
        return bytes([frame[0] & 0x7F]) + frame[1:]

    data = await closed_with_1009(
        small_body_service,
        fragment(0x1, b"x" * 1500) + fragment(0x0, b"x" * 1000)  # 2,500 characters, and more to come
        + _client_frame(0x0, b"x" * 100)  # its end
        + b"".join(_client_frame(0x1, b"not json") for _ in range(30)),
    )
    assert data[1] == 2, f"not hypercorn's close (a code, no reason) but the app's: {data[:60]!r}"


@pytest.mark.anyio
async def test_an_oversized_frame_alone_closes_the_socket(small_body_service: ServerProcess) -> None:
    sock = _handshake(small_body_service.port)
    try:
        sock.sendall(_client_frame(0x1, b"x" * 2000))
        data, eof = await anyio.to_thread.run_sync(_read_until_eof, sock, 3.0)
        assert int.from_bytes(data[2:4], "big") == 1009 and eof
    finally:
        sock.close()


@pytest.mark.anyio
@pytest.mark.parametrize(("frame", "code"), [
    (b"\x81\x05hello", 1002),  # not masked: a client's frames must be
    (_client_frame(0x1, b"\xff\xfe"), 1007),  # a text message that is not UTF-8
    (_client_frame(0x3, b"x"), 1002),  # a reserved opcode
])
async def test_a_frame_that_breaks_the_protocol_gets_a_close_frame_saying_why(
    small_body_service: ServerProcess, frame: bytes, code: int
) -> None:
    """RFC 6455 7.1.7: an endpoint failing an established connection should send a close frame
    with the reason's code first. hypercorn dropped the connection without one, so a client
    library saw 1006 (abnormal closure) and could not tell its own bug from a network failure."""
    sock = _handshake(small_body_service.port)
    client_port = sock.getsockname()[1]
    try:
        sock.sendall(frame)
        data, eof = await anyio.to_thread.run_sync(_read_until_eof, sock, 3.0)
        assert data.startswith(b"\x88") and int.from_bytes(data[2:4], "big") == code, data[:40]
        assert eof
    finally:
        sock.close()
    await anyio.sleep(1.0)
    assert not {"ESTAB", "CLOSE-WAIT"} & set(_server_sockets(small_body_service.port, client_port))
