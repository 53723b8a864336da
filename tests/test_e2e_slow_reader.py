"""A client that reads all the time, only slowly (a mobile link), is not dropped as one that
stopped reading (README: "a client that takes no data for this long is dropped")."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.e2e import ServerProcess, running_service
from tests.e2e import dump_server_logs_on_failure, fake_upstream  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.timeout(90)


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
    base = service.url
    with httpx.Client(trust_env=False, timeout=30) as client:
        thread_id = client.post(f"{base}/threads").json()["thread_id"]
    message = 'tool:slow_tool {"seconds": 2}\ntool:get_weather {"city": "' + "x" * 1_500_000 + '"}'
    body = orjson.dumps({"thread_id": thread_id, "message": message})

    port = int(base.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    # Segments of a real network path, not loopback's 64 KiB: the kernel then sizes the service's
    # send buffer as for a remote client, not at megabytes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = bytearray()
    started = time.monotonic()
    while True:  # about 400 KB/s (3.2 Mbit/s), never pausing for more than ~20 ms
        chunk = sock.recv(8_000)
        if not chunk:
            break
        received += chunk
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    sock.close()
    log = service.output()
    assert b"event: metadata" in received and received.endswith(b"\r\n0\r\n\r\n"), (
        f"the stream was cut after {len(received)} bytes and {elapsed:.1f} s, though the client never "
        f"stopped reading; dropped as slow: {'dropping a client that stopped reading' in log}")
