"""Graceful shutdown of the real server: SIGTERM, a grace period, then a clean `shutting_down` end."""

from __future__ import annotations

import json
import signal
import time

import anyio
import httpx
import pytest
import websockets

from tests.e2e import ServerProcess, fake_upstream, start_service  # noqa: F401  (fixture)
from tests.test_chat_api import parse_sse


async def open_stream(client: httpx.AsyncClient, url: str, message: str) -> tuple[httpx.Response, str]:
    thread_id = (await client.post(f"{url}/threads")).json()["thread_id"]
    request = client.build_request("POST", f"{url}/chat", json={"thread_id": thread_id, "message": message},
                                   headers={"accept": "text/event-stream"})
    return await client.send(request, stream=True), thread_id


async def read_all(response: httpx.Response) -> list[dict]:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
    return [item for item in parse_sse(body.decode()) if "event" in item]


@pytest.mark.anyio
async def test_sigterm_ends_long_streams_after_the_grace_with_shutting_down(fake_upstream: ServerProcess) -> None:
    service = start_service(fake_upstream.url, name="shutdown-service", SHUTDOWN_GRACE_SECONDS="1")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")  # 20 s of text
            short, _ = await open_stream(client, service.url, "fault:slow 0.1 5")  # done within the grace
            await anyio.sleep(0.3)
            signalled = time.monotonic()
            service.signal_group(signal.SIGTERM)
            short_events = await read_all(short)
            long_events = await read_all(long)
            ended = time.monotonic() - signalled
        assert [e["event"] for e in short_events][-2:] == ["thread.run.completed", "metadata"]
        assert long_events[-1]["event"] == "error"
        assert long_events[-1]["data"]["type"] == "shutting_down"
        assert 0.8 < ended < 3.0  # the grace (1 s), well within hypercorn's own 3 s limit
        assert service.proc is not None and service.proc.wait(10) == 0
    finally:
        service.stop()


@pytest.mark.anyio
async def test_no_new_turns_after_sigterm_and_websockets_are_told_to_go_away(fake_upstream: ServerProcess) -> None:
    """A WebSocket with no turn closes at once with 1001 (the client reconnects elsewhere); one in
    a turn gets the turn's end (`shutting_down` after the grace), then the same close."""
    service = start_service(fake_upstream.url, name="shutdown-service-ws", SHUTDOWN_GRACE_SECONDS="1")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            busy_thread = (await client.post(f"{service.url}/threads")).json()["thread_id"]
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")
            ws_url = service.url.replace("http://", "ws://") + "/ws/chat"
            async with websockets.connect(ws_url) as idle, websockets.connect(ws_url) as busy:
                await busy.send(json.dumps({"thread_id": busy_thread, "message": "fault:slow 0.2 100"}))
                assert json.loads(await busy.recv())["event"] == "thread.run.created"
                service.signal_group(signal.SIGTERM)
                with anyio.fail_after(2), pytest.raises(websockets.ConnectionClosed) as gone:
                    await idle.recv()
                assert gone.value.rcvd is not None and gone.value.rcvd.code == 1001
                frames = []
                with anyio.fail_after(3), pytest.raises(websockets.ConnectionClosed) as ended:
                    while True:
                        frames.append(json.loads(await busy.recv()))
                assert frames[-1]["event"] == "error" and frames[-1]["data"]["type"] == "shutting_down", frames[-1:]
                assert ended.value.rcvd is not None and ended.value.rcvd.code == 1001
            await read_all(long)
    finally:
        service.stop()


@pytest.mark.anyio
async def test_sigterm_to_a_single_process_server(fake_upstream: ServerProcess) -> None:
    """`hypercorn --workers 0` (one process, as in a container): a SIGTERM to it alone is enough."""
    service = start_service(fake_upstream.url, name="single-process", hypercorn_args=("--workers", "0"),
                            SHUTDOWN_GRACE_SECONDS="1")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")
            await anyio.sleep(0.3)
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)  # the process only, not its group
            events = await read_all(long)
        assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "shutting_down"
        assert service.proc.wait(10) == 0
    finally:
        service.stop()
