"""Graceful shutdown of the real server: SIGTERM, a grace period, then a clean `shutting_down` end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import anyio
import httpx
import pytest
import websockets

from tests.e2e import (  # noqa: F401  (fixture)
    REPO,
    ServerProcess,
    fake_upstream,
    free_port,
    procfile_hypercorn_args,
    service_environment,
    start_service,
)
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
async def test_sigterm_after_websocket_turns_is_prompt_and_quiet(fake_upstream: ServerProcess) -> None:
    """hypercorn 0.18's WebSocket ping loop (WS_PING_SECONDS, 20 s) slept a whole interval after
    its socket closed, holding the connection: a shutdown then waited out hypercorn's
    graceful_timeout (11 s here) and logged a traceback for each WebSocket of the last 20 s.
    assistant/hypercorn_mends.py's loop wakes at the close."""
    service = start_service(fake_upstream.url, name="shutdown-after-ws", SHUTDOWN_GRACE_SECONDS="10")
    try:
        ws_url = service.url.replace("http://", "ws://") + "/ws/chat"
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            for _ in range(3):
                thread_id = (await client.post(f"{service.url}/threads")).json()["thread_id"]
                async with websockets.connect(ws_url) as ws:
                    await ws.send(json.dumps({"thread_id": thread_id, "message": "hello"}))
                    while json.loads(await ws.recv())["event"] != "metadata":
                        pass
        await anyio.sleep(0.3)  # the sockets are closed
        offset = service.output_size()
        signalled = time.monotonic()
        service.signal_group(signal.SIGTERM)
        assert service.proc is not None and service.proc.wait(10) == 0
        assert time.monotonic() - signalled < 1.5
        lines = [json.loads(line) for line in service.output(offset).splitlines() if line.startswith("{")]
        assert not [e for e in lines if e["level"] in ("ERROR", "CRITICAL")], lines
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


def _procfile_command_exit(env_overrides: dict[str, str], fake_url: str) -> tuple[int, str]:
    """Start the Procfile's command with these settings; its exit code and output (it must not start)."""
    env = service_environment(fake_url, **env_overrides)
    command = [sys.executable, "-m", "hypercorn", "app:app", "--bind", f"127.0.0.1:{free_port()}",
               *procfile_hypercorn_args()]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"TOOL_TIMEOUT_SECONDS": "soon"}, "configuration error: TOOL_TIMEOUT_SECONDS must be a number, got 'soon'"),
        ({"ASSISTANT_TOOLS": "tests.no_such_tools_module"},
         "configuration error: cannot import tool module 'tests.no_such_tools_module': ModuleNotFoundError"),
    ],
)
def test_the_procfile_command_exits_non_zero_with_one_line_on_a_bad_setting(
    fake_upstream: ServerProcess, setting: dict[str, str], expected: str
) -> None:
    """A service that cannot start must say so by its exit code as the platform runs it, or a crash
    loop looks like clean exits: systemd's `Restart=on-failure` and Docker's `--restart on-failure`
    would not restart it, and nothing alerts. (hypercorn's parent process exits 0 whatever its
    worker's exit code was: the Procfile must not put one in between.)"""
    code, output = _procfile_command_exit(setting, fake_upstream.url)
    assert code == 2, output
    assert output.strip().splitlines() == [output.strip().splitlines()[0]] and output.startswith(expected), output


@pytest.mark.anyio
async def test_sigterm_to_the_procfile_process_alone_ends_streams_with_shutting_down(
    fake_upstream: ServerProcess,
) -> None:
    """`docker stop` and Kubernetes signal the container's PID 1 only: the Procfile's command must
    give running turns their grace and a `shutting_down` end then too, not have hypercorn cut the
    streams mid-event after its --graceful-timeout, and exit 0 in time."""
    service = start_service(fake_upstream.url, name="procfile-pid-1", SHUTDOWN_GRACE_SECONDS="1")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")
            await anyio.sleep(0.3)
            assert service.proc is not None
            signalled = time.monotonic()
            service.proc.send_signal(signal.SIGTERM)  # the process the Procfile starts, alone
            events = await read_all(long)
            ended = time.monotonic() - signalled
        assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "shutting_down", events[-2:]
        assert 0.8 < ended < 2.0
        assert service.proc.wait(5) == 0
    finally:
        service.stop()


@pytest.mark.anyio
async def test_a_grace_longer_than_hypercorns_default_graceful_timeout_still_ends_with_shutting_down(
    fake_upstream: ServerProcess,
) -> None:
    """SHUTDOWN_GRACE_SECONDS over hypercorn's default --graceful-timeout (3 s): hypercorn must not
    cut the streams before the grace is over (a client would see a broken chunked body, no
    `error` event); they end with `shutting_down` after the grace, and the process exits 0."""
    service = start_service(fake_upstream.url, name="long-grace", SHUTDOWN_GRACE_SECONDS="4")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")  # 20 s of text
            await anyio.sleep(0.3)
            signalled = time.monotonic()
            service.signal_group(signal.SIGTERM)
            events = await read_all(long)
            ended = time.monotonic() - signalled
        assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "shutting_down", events[-2:]
        assert 3.8 < ended < 5.5
        assert service.proc is not None and service.proc.wait(5) == 0
        assert '"level":"ERROR"' not in service.output()  # no cancelled-connection traceback
    finally:
        service.stop()


def _hypercorn_worker(parent_pid: int) -> int:
    """The pid of hypercorn's worker under `parent_pid` (not multiprocessing's resource tracker)."""
    for _ in range(50):
        found = subprocess.run(["pgrep", "-P", str(parent_pid), "-f", "spawn_main"], capture_output=True, text=True)
        if found.stdout.split():
            return int(found.stdout.split()[0])
        time.sleep(0.1)
    raise AssertionError(f"no hypercorn worker under {parent_pid}")


@pytest.mark.anyio
async def test_sigterm_to_hypercorns_worker_alone_still_stops_the_server(fake_upstream: ServerProcess) -> None:
    """With `--workers 1`, a SIGTERM to the worker alone (`kill <pid>` of the process doing the
    work) once left it up for good, answering 503 to every turn and /health, with nothing to
    restart it. The turn ends with `shutting_down` after the grace and the whole server exits 0."""
    service = start_service(fake_upstream.url, name="worker-alone", hypercorn_args=("--workers", "1"),
                            SHUTDOWN_GRACE_SECONDS="1")
    try:
        assert service.proc is not None
        worker = _hypercorn_worker(service.proc.pid)
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            long, _ = await open_stream(client, service.url, "fault:slow 0.2 100")
            await anyio.sleep(0.3)
            os.kill(worker, signal.SIGTERM)
            events = await read_all(long)
        assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "shutting_down", events[-2:]
        assert service.proc.wait(5) == 0
    finally:
        service.stop()
