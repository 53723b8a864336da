"""A client that reads all the time, only slowly (a mobile link), is not dropped as one that
stopped reading (README: "a client that takes no data for this long is dropped"), over SSE or
a WebSocket."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.e2e import ServerProcess, running_service
from tests.e2e import dump_server_logs_on_failure, fake_upstream  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.timeout(90)


def big_turn(service: ServerProcess) -> dict[str, str]:
    """A turn with a tool call whose input is 1.5 MB: its step events are ~3 MB."""
    with httpx.Client(trust_env=False, timeout=30) as client:
        thread_id = client.post(f"{service.url}/threads").json()["thread_id"]
    return {"thread_id": thread_id,
            "message": 'tool:slow_tool {"seconds": 2}\ntool:get_weather {"city": "' + "x" * 1_500_000 + '"}'}


def slow_link(service: ServerProcess) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    # Segments of a real network path, not loopback's 64 KiB: the kernel then sizes the service's
    # send buffer as for a remote client, not at megabytes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.connect(("127.0.0.1", service.port))
    return sock


def read_slowly(sock: socket.socket, until: bytes | None) -> tuple[bytearray, float]:
    """About 400 KB/s (3.2 Mbit/s), never pausing for more than ~20 ms, until the end (or `until`)."""
    received = bytearray()
    started = time.monotonic()
    while until is None or until not in received[-len(until) - 8_000:]:
        chunk = sock.recv(8_000)
        if not chunk:
            break
        received += chunk
        time.sleep(0.02)
    sock.close()
    return received, time.monotonic() - started


@pytest.fixture(scope="module")
def service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:  # noqa: F811
    with running_service(fake_upstream.url, name="slow-reader-service", SLOW_CLIENT_TIMEOUT_SECONDS="3",
                         SSE_HEARTBEAT_SECONDS="0.5", TOOL_TIMEOUT_SECONDS="10", MAX_MESSAGE_CHARS="4000000",
                         MAX_BODY_BYTES="8000000", STREAM_MAX_BYTES_PER_RUN="33554432") as server:
        yield server


def test_a_live_stream_read_steadily_by_a_slow_client_is_delivered_whole(service: ServerProcess) -> None:
    """A tool call whose input is large (1.5 MB): its step events are one batch of ~3 MB. The
    client takes ~400 KB/s without ever pausing more than 20 ms: the slow-client timeout (3 s
    here) restarts with each piece of that batch it took, so the whole run (the slow tool's end,
    the answer, metadata) reaches it and the chunked body ends cleanly."""
    body = orjson.dumps(big_turn(service))
    sock = slow_link(service)
    sock.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received, elapsed = read_slowly(sock, until=None)
    log = service.output()
    assert b"event: metadata" in received and received.endswith(b"\r\n0\r\n\r\n"), (
        f"the stream was cut after {len(received)} bytes and {elapsed:.1f} s, though the client never "
        f"stopped reading; dropped as slow: {'dropping a client that stopped reading' in log}")


def test_a_websocket_read_steadily_by_a_slow_client_gets_a_frame_that_takes_longer_than_the_timeout(
    service: ServerProcess,
) -> None:
    """The same turn over a WebSocket: its step events are 1.5 MB frames, each taking ~4 s at that
    rate, past the 3 s timeout. A frame cannot be cut, so a large one gets the timeout once for
    each 64 KiB (the least rate SSE asks for); the whole turn arrives."""
    sock = slow_link(service)
    sock.sendall(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = orjson.dumps(big_turn(service))
    # A masked text frame (the all-zero mask leaves the payload as it is) with a 64-bit length.
    sock.sendall(b"\x81\xff" + struct.pack("!Q", len(payload)) + b"\0\0\0\0" + payload)
    received, elapsed = read_slowly(sock, until=b'{"event":"metadata"')
    log = service.output()
    assert b'{"event":"metadata"' in received and b'"event":"thread.run.completed"' in received, (
        f"the socket was cut after {len(received)} bytes and {elapsed:.1f} s, though the client never "
        f"stopped reading; dropped as slow: {'dropping a WebSocket client that stopped reading' in log}")
