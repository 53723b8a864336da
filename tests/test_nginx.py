"""The shipped deploy/nginx.conf, run by a real nginx in front of the real service.

Through nginx (tests/nginx_proxy.py renders the shipped server block on a loopback port) at the
root, under the /assistant/ prefix, and at the test-only /defaults/ location (nginx's proxy
defaults: HTTP/1.0 to the service, buffering on): SSE deltas arrive one by one as the service
sends them, a WebSocket turn works, the chat page and its static files load under the prefix.
The config never turns proxy buffering off; the service's `X-Accel-Buffering: no` header is what
keeps SSE streaming. The negative control proves it: when nginx is told to ignore that header,
/defaults/ delivers the same stream in one lump at the end. The errors nginx answers itself
(413, 502, 504) come in the service's JSON shape.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from tests.e2e import REPO, ServerProcess, free_port
from tests.e2e import dump_server_logs_on_failure, fake_upstream  # noqa: F401
from tests.nginx_proxy import DEPLOY_CONF, NginxProxy, temp_paths
from tests.nginx_proxy import nginx_binary, nginx_logs_on_failure, nginx_proxy, nginx_service  # noqa: F401

pytestmark = pytest.mark.timeout(60)

RUN_CREATED = "thread.run.created"
DELTA = "thread.message.delta"
MESSAGE_COMPLETED = "thread.message.completed"
RUN_COMPLETED = "thread.run.completed"
METADATA = "metadata"

SLOW_MESSAGE = "fault:slow 0.2 10"  # the fake sends ten text deltas, 0.2 s apart (about 2 s)
SLOW_REPLY = " ".join(f"word{n}" for n in range(10))
MIN_SPREAD_SECONDS = 1.2  # first to last delta when they stream (about 1.8 s are sent)
MAX_DELTAS_PER_READ = 3
LUMP_SPREAD_SECONDS = 0.3  # first to last delta when nginx buffers them all
SSE_HEARTBEAT_DEFAULT_SECONDS = 15  # the service's default SSE_HEARTBEAT_SECONDS
STATIC = REPO / "assistant" / "static"

LOCATIONS = ["root", "prefixed", "defaults"]


def base_url(proxy: NginxProxy, location: str) -> str:
    """The folder URL a client resolves the service's relative paths against (as the chat page does)."""
    return {"root": proxy.url, "prefixed": proxy.prefixed_url, "defaults": proxy.defaults_url}[location] + "/"


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(20.0))


async def new_thread(client: httpx.AsyncClient, base: str, correlation_id: str) -> str:
    response = await client.post(urljoin(base, "threads"), headers={"X-Correlation-ID": correlation_id})
    assert response.status_code == 200, response.text
    # X-Correlation-ID goes through nginx both ways.
    assert response.headers["x-correlation-id"] == correlation_id
    body = response.json()
    assert body["correlation_id"] == correlation_id
    return body["thread_id"]


# ---------------------------------------------------------------------------------------------
# SSE, read as it arrives


@dataclass
class Event:
    name: str
    data: Any
    at: float  # time.monotonic() when the read completing it returned


@dataclass
class Stream:
    status: int
    headers: httpx.Headers
    started: float
    events: list[Event] = field(default_factory=list)
    deltas_per_read: list[int] = field(default_factory=list)  # deltas each read completed

    @property
    def deltas(self) -> list[Event]:
        return [e for e in self.events if e.name == DELTA]

    @property
    def text(self) -> str:
        return "".join(e.data["delta"]["content"] for e in self.deltas)


def parse_block(block: str, at: float) -> Event | None:
    """One SSE block (the service frames with \\n); None for a comment or the retry field."""
    name, data = "message", []
    for line in block.split("\n"):
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
    return Event(name, json.loads("\n".join(data)), at) if data else None


async def sse_chat(client: httpx.AsyncClient, base: str, thread_id: str, message: str) -> Stream:
    """POST chat asking for SSE and read it to the end, timing each read on the client side."""
    started = time.monotonic()
    with anyio.fail_after(20):
        async with client.stream(
            "POST", urljoin(base, "chat"),
            json={"thread_id": thread_id, "message": message}, headers={"Accept": "text/event-stream"},
        ) as response:
            result = Stream(response.status_code, response.headers, started)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
                raise AssertionError(f"not an event stream: {response.status_code} {response.text}")
            decoder = codecs.getincrementaldecoder("utf-8")()
            buffer = ""
            async for chunk in response.aiter_raw():
                at = time.monotonic()
                buffer += decoder.decode(chunk)
                *blocks, buffer = buffer.split("\n\n")
                events = [e for e in (parse_block(b, at) for b in blocks) if e is not None]
                result.events += events
                result.deltas_per_read.append(sum(1 for e in events if e.name == DELTA))
    assert buffer == "", f"the stream ended inside an event: {buffer!r}"
    return result


def check_complete(result: Stream) -> None:
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers.get("cache-control") == "no-cache"
    names = [e.name for e in result.events]
    assert names[0] == RUN_CREATED and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA], names
    assert len(result.deltas) == 10, names
    assert result.text == SLOW_REPLY


def timing(result: Stream) -> str:
    return "deltas at " + ", ".join(f"{e.at - result.started:.2f}s" for e in result.deltas) + (
        f"; deltas per read {result.deltas_per_read}"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("location", LOCATIONS)
async def test_sse_deltas_arrive_one_by_one_through_nginx(nginx_proxy: NginxProxy, location: str) -> None:
    base = base_url(nginx_proxy, location)
    async with http_client() as client:
        thread_id = await new_thread(client, base, f"nginx-sse-{location}")
        result = await sse_chat(client, base, thread_id, SLOW_MESSAGE)
    check_complete(result)
    # nginx acts on X-Accel-Buffering and, by default, does not pass it on to the client.
    assert "x-accel-buffering" not in result.headers
    deltas = result.deltas
    assert deltas[-1].at - deltas[0].at >= MIN_SPREAD_SECONDS, f"nginx buffered the stream: {timing(result)}"
    assert max(result.deltas_per_read) <= MAX_DELTAS_PER_READ, f"deltas came in batches: {timing(result)}"


@pytest.mark.anyio
async def test_negative_control_nginx_ignoring_x_accel_buffering_delivers_one_lump(
    nginx_binary: str, nginx_service: ServerProcess
) -> None:
    """The same stream through /defaults/, with nginx told to ignore the service's header: buffered.

    This proves the header is what keeps /defaults/ (and the shipped locations, which leave
    buffering on as well) streaming, and that the timing checks above can fail.
    """
    ignore = "proxy_ignore_headers X-Accel-Buffering;"
    with NginxProxy(nginx_service, nginx=nginx_binary, defaults_extra=ignore) as lumpy:
        assert ignore in lumpy.config_path.read_text()
        base = base_url(lumpy, "defaults")
        async with http_client() as client:
            thread_id = await new_thread(client, base, "nginx-lump")
            result = await sse_chat(client, base, thread_id, SLOW_MESSAGE)
    check_complete(result)  # nothing is lost, it only comes late
    deltas = result.deltas
    assert deltas[-1].at - deltas[0].at < LUMP_SPREAD_SECONDS, f"expected one lump: {timing(result)}"
    assert deltas[0].at - result.started >= 1.5, f"expected the lump at the end of the ~2 s turn: {timing(result)}"
    assert max(result.deltas_per_read) > MAX_DELTAS_PER_READ, timing(result)


# ---------------------------------------------------------------------------------------------
# WebSocket


@pytest.mark.anyio
@pytest.mark.parametrize("location", ["root", "prefixed"])
async def test_websocket_turn_through_nginx(nginx_proxy: NginxProxy, location: str) -> None:
    base = base_url(nginx_proxy, location)
    correlation_id = f"nginx-ws-{location}"
    async with http_client() as client:
        thread_id = await new_thread(client, base, correlation_id)
    url = urljoin(base, "ws/chat").replace("http://", "ws://", 1)  # as chat.js builds it
    message = f"hello through nginx at {location}"
    frames = []
    async with connect(url, proxy=None, open_timeout=5, additional_headers={"X-Correlation-ID": correlation_id}) as ws:
        assert ws.response is not None and ws.response.headers["x-correlation-id"] == correlation_id
        # The client offered permessage-deflate (websockets does, as browsers do): nginx passes the
        # offer on, and the service declines it (WS_COMPRESSION is off).
        assert "permessage-deflate" in ws.request.headers["sec-websocket-extensions"]
        assert "sec-websocket-extensions" not in ws.response.headers
        await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
        with anyio.fail_after(15):
            while not frames or frames[-1]["event"] != METADATA:
                frame = await ws.recv()
                assert isinstance(frame, str)
                frames.append(json.loads(frame))
                assert frames[-1]["event"] != "error", frames[-1]
    names = [f["event"] for f in frames]
    assert names[0] == RUN_CREATED and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA], names
    reply = f"You said: {message}"
    assert "".join(f["data"]["delta"]["content"] for f in frames if f["event"] == DELTA) == reply
    assert frames[-3]["data"]["message"]["content"] == reply
    assert frames[-1]["data"]["thread_id"] == thread_id
    assert frames[-1]["data"]["correlation_id"] == correlation_id


# ---------------------------------------------------------------------------------------------
# The chat page under the prefix


@pytest.mark.anyio
async def test_chat_page_and_its_static_files_load_under_the_prefix(nginx_proxy: NginxProxy) -> None:
    page_url = base_url(nginx_proxy, "prefixed")
    async with http_client() as client:
        page = await client.get(page_url)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.text == (STATIC / "index.html").read_text()
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"static/chat.js", "static/chat.css"} <= set(refs), refs
        assert not [r for r in refs if r.startswith("/") or "://" in r], f"absolute URLs break under a prefix: {refs}"
        script = await client.get(urljoin(page_url, "static/chat.js"))
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert script.text == (STATIC / "chat.js").read_text()
        style = await client.get(urljoin(page_url, "static/chat.css"))
        assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
        # The prefix without its slash is sent to the page's real address, where relative URLs resolve.
        bare = await client.get(nginx_proxy.prefixed_url)
        assert bare.status_code == 301 and urlsplit(bare.headers["location"]).path == "/assistant/"


# ---------------------------------------------------------------------------------------------
# The shipped file itself


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    return int(match[1]) * units[match[2] or "s"]


@pytest.mark.anyio
async def test_the_errors_nginx_answers_itself_are_in_the_services_json_shape(nginx_proxy: NginxProxy) -> None:
    """A body over nginx's client_max_body_size (1 MiB), the service unreachable, the service
    silent past proxy_read_timeout (1 s at the test-only /impatient/): each comes in the shape the
    service's own errors have, a client's valid correlation ID kept, else nginx's request id."""
    async with http_client() as client:
        too_large = await client.post(f"{nginx_proxy.prefixed_url}/chat", content=b"x" * 1_200_000,
                                      headers={"Content-Type": "application/json", "X-Correlation-ID": "big-body-1"})
        unreachable = await client.get(f"{nginx_proxy.url}/unreachable/health",
                                       headers={"X-Correlation-ID": "not safe!"})
        thread_id = await new_thread(client, nginx_proxy.url + "/", "nginx-timeout-1")
        silent = await client.post(f"{nginx_proxy.url}/impatient/chat",
                                   json={"thread_id": thread_id, "message": "fault:slow 0.5 6"})
    for response, status, type in ((too_large, 413, "payload_too_large"), (unreachable, 502, "service_unreachable"),
                                   (silent, 504, "service_timeout")):
        assert response.status_code == status, (response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["type"] == type and body["correlation_id"] == response.headers["x-correlation-id"], body
        assert body["error"]
    assert too_large.json()["correlation_id"] == "big-body-1"
    assert re.fullmatch("[0-9a-f]{32}", unreachable.json()["correlation_id"])
    assert unreachable.headers["retry-after"] == "5" and unreachable.json()["retry_after_seconds"] == 5


def test_the_shipped_config_leaves_buffering_to_the_service() -> None:
    directives = re.sub(r"#[^\n]*", "", DEPLOY_CONF.read_text())
    assert "proxy_buffering" not in directives, "the service's X-Accel-Buffering header must do this"
    assert "proxy_ignore_headers" not in directives
    timeouts = [_seconds(v) for v in re.findall(r"proxy_read_timeout\s+(\S+);", directives)]
    assert len(timeouts) == 4 and min(timeouts) > SSE_HEARTBEAT_DEFAULT_SECONDS, timeouts
    for location in ("/ws/", "/assistant/ws/"):
        block = re.search(rf"location {re.escape(location)} \{{([^}}]*)\}}", directives)
        assert block, location
        assert "proxy_set_header Upgrade $http_upgrade;" in block[1]
        assert 'proxy_set_header Connection "upgrade";' in block[1]


def test_the_shipped_file_passes_nginx_t_beside_debians_default_site(nginx_binary: str, tmp_path: Path) -> None:
    """As deployed: in sites-enabled/ of the stock /etc/nginx, next to its default site, no warning."""
    etc = Path("/etc/nginx")
    if not (etc / "nginx.conf").is_file() or not (etc / "sites-enabled").is_dir():
        pytest.skip("no Debian-style /etc/nginx (nginx.conf including sites-enabled/) on this machine")
    copy = tmp_path / "etc-nginx"
    shutil.copytree(etc, copy)  # symlinks (sites-enabled/default) are copied as files
    (copy / "sites-enabled" / "assistant-gateway").write_text(DEPLOY_CONF.read_text())
    # `nginx -t` binds the listen ports (a port in use is fine, port 80 as non-root is not): every
    # site moves from 80 to the same free port, so server names still clash if they would.
    port = free_port()
    for site in (copy / "sites-enabled").iterdir():
        text = re.sub(r"^(\s*listen\s+(?:\S+:)?)80\b", rf"\g<1>{port}", site.read_text(), flags=re.M)
        site.write_text(text)
    main = (copy / "nginx.conf").read_text().replace(str(etc), str(copy))
    # Only what a test cannot write moves to tmp_path: the pid file, the logs, the temp folders.
    main = re.sub(r"^(\s*)pid\s[^;]*;", rf"\g<1>pid {tmp_path}/nginx.pid;", main, flags=re.M)
    main = re.sub(r"^(\s*)(error_log|access_log)\s[^;]*;", rf"\g<1>\g<2> {tmp_path}/\g<2>.log;", main, flags=re.M)
    main = re.sub(r"^http\s*\{", lambda m: m[0] + "\n" + temp_paths(tmp_path), main, count=1, flags=re.M)
    (copy / "nginx.conf").write_text(main)
    done = subprocess.run(
        [nginx_binary, "-t", "-p", f"{tmp_path}/", "-c", str(copy / "nginx.conf"), "-e", "stderr"],
        capture_output=True, text=True, timeout=10,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    problems = [
        line for line in output.splitlines()
        if re.search(r"\[(warn|error|crit|alert|emerg)\]", line) and '"user" directive' not in line  # not root
    ]
    assert not problems, output
