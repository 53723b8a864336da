"""A fast fake OpenAI upstream for the benchmark: Responses + Conversations API, nothing else.

Why not tests/fake_openai.py: it is a Starlette app under hypercorn, correct but costly per event,
and the benchmark shares a core between this process and the load generator. This one is raw
asyncio (asyncio.start_server, HTTP/1.1 parsed by hand, keep-alive), so its CPU per delta is a
few microseconds and it never becomes the bottleneck.

The "model" is driven by the user message text, e.g. `bench n=50 rate=20 stall=0`:
  n      number of response.output_text.delta events (default 5)
  rate   deltas per second for this stream; 0 = as fast as possible (default 0)
  stall  seconds to stay silent after response.created (idle streams); POST /_bench/release
         ends every current stall at once (default 0)
Each delta's text is `"<time.time() when sent, 6 decimals>|"`: the client subtracts it from its
receive time (same machine, same clock) to get the end-to-end latency through the service.
The first delta is written right after the response's opening events, with no wait, and its text
also says when the request had been read: `"<sent>/<request read>|"`. The client takes that
upstream time out of its time to first delta: what is left is the service's (and the network's)
overhead. It is small but not nil: the fake shares its core with the load generator.

Endpoints: POST /v1/conversations, POST /v1/responses (stream), GET /health,
POST /_bench/release, GET /_bench/stats.

Run: python bench/fast_upstream.py [--host 127.0.0.1] [--port 0]; prints `PORT <n>` when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import sys
import time
from typing import Any

import orjson

PARAM = re.compile(r"\b(n|rate|stall)=([0-9]+(?:\.[0-9]*)?)")
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
# A stream writes without awaiting drain until this much is buffered (a slow reader, or rate=0).
WRITE_HIGH_WATER = 256 * 1024


def raise_fd_limit() -> None:
    """1,000 streams mean thousands of sockets: take the hard limit of open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_params(text: str) -> tuple[int, float, float]:
    params = {"n": 5.0, "rate": 0.0, "stall": 0.0}
    for name, value in PARAM.findall(text):
        params[name] = float(value)
    return int(params["n"]), params["rate"], params["stall"]


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a Responses request (string or input_text parts)."""
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items or []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    return ""


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk (Transfer-Encoding: chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(name: bytes, data: bytes) -> bytes:
    """One SSE event as OpenAI frames it (event: + data:), as one HTTP chunk."""
    return chunk(b"event: " + name + b"\ndata: " + data + b"\n\n")


def json_response(status: int, data: Any, reason: bytes = b"OK") -> bytes:
    body = orjson.dumps(data)
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status, reason, len(body), body)


class FastUpstream:
    def __init__(self) -> None:
        self.conversations = 0
        self.responses = 0
        self.deltas_sent = 0
        self.open_streams = 0
        self.release = asyncio.Event()

    # -- HTTP/1.1 connection loop

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed its keep-alive connection
                request_line, *header_lines = head[:-4].split(b"\r\n")
                method, target, version = request_line.split(b" ", 2)
                headers: dict[bytes, bytes] = {}
                for line in header_lines:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if b"content-length" in headers:
                    body = await reader.readexactly(int(headers[b"content-length"]))
                elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    body = await self._read_chunked(reader)
                else:
                    body = b""
                keep_alive = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
                await self.route(method, target.split(b"?", 1)[0], body, writer, time.time())
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return  # the service hung up mid-response (a cancelled run) or sent garbage
        finally:
            writer.close()

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])

    async def route(self, method: bytes, path: bytes, body: bytes, writer: asyncio.StreamWriter,
                    received: float) -> None:
        if method == b"POST" and path == b"/v1/responses":
            await self.stream_response(orjson.loads(body), writer, received)
        elif method == b"POST" and path == b"/v1/conversations":
            self.conversations += 1
            writer.write(json_response(200, {"id": f"conv_bench{self.conversations}", "object": "conversation",
                                             "created_at": 0, "metadata": {}}))
        elif method == b"GET" and path == b"/health":
            writer.write(json_response(200, {"status": "ok"}))
        elif method == b"POST" and path == b"/_bench/release":
            released = self._release_stalls()
            writer.write(json_response(200, {"released": released}))
        elif method == b"GET" and path == b"/_bench/stats":
            writer.write(json_response(200, {"conversations": self.conversations, "responses": self.responses,
                                             "deltas_sent": self.deltas_sent, "open_streams": self.open_streams}))
        else:
            error = {"error": {"message": f"no route {method.decode()} {path.decode()}",
                               "type": "invalid_request_error", "param": None, "code": None}}
            writer.write(json_response(404, error, b"Not Found"))

    def _release_stalls(self) -> bool:
        # Waiters hold the old event; a fresh one makes later stalls wait again.
        event, self.release = self.release, asyncio.Event()
        event.set()
        return True

    # -- a streamed response

    async def stream_response(self, body: dict[str, Any], writer: asyncio.StreamWriter, received: float) -> None:
        n, rate, stall = parse_params(last_user_text(body))
        self.responses += 1
        number = self.responses
        resp_id, msg_id = f"resp_bench{number}", f"msg_bench{number}"
        conversation = body.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        response = {
            "id": resp_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "completed_at": None,
            "conversation": {"id": conversation} if conversation else None, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"), "max_output_tokens": None,
            "max_tool_calls": None, "model": body.get("model", "gpt-4.1-mini"), "output": [],
            "parallel_tool_calls": True, "previous_response_id": None, "prompt_cache_key": None,
            "reasoning": {"effort": None, "summary": None}, "safety_identifier": None, "service_tier": "default",
            "store": True, "temperature": 1, "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto", "tools": body.get("tools") or [], "top_logprobs": 0, "top_p": 1,
            "truncation": "disabled", "usage": None, "user": None, "metadata": {},
        }
        seq = 0

        def event(name: str, **fields: Any) -> bytes:
            nonlocal seq
            data = orjson.dumps({"type": name, **fields, "sequence_number": seq})
            seq += 1
            return sse(name.encode(), data)

        where = {"item_id": msg_id, "output_index": 0}
        item = {"id": msg_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        # The delta is the hot path: formatted from a template, not built through a dict.
        delta_template = (
            b'{"type":"response.output_text.delta","content_index":0,"delta":"%s","item_id":"'
            + msg_id.encode() + b'","logprobs":[],"output_index":0,"sequence_number":%d}'
        )
        self.open_streams += 1
        try:
            writer.write(SSE_HEAD + event("response.created", response=response))
            if stall > 0:
                try:
                    await asyncio.wait_for(self.release.wait(), stall)
                except asyncio.TimeoutError:
                    pass
            writer.write(
                event("response.in_progress", response=response)
                + event("response.output_item.added", item=item, output_index=0)
                + event("response.content_part.added", content_index=0, **where, part=part)
            )
            loop = asyncio.get_running_loop()
            transport = writer.transport
            texts = []
            start = loop.time()
            for k in range(n):
                if transport.is_closing():
                    return  # the service hung up (run cancelled): stop producing
                if rate > 0:
                    # Scheduled from the start, not from the last send: no drift at any load.
                    delay = start + k / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                text = b"%.6f|" % time.time() if k else b"%.6f/%.6f|" % (time.time(), received)
                texts.append(text)
                writer.write(sse(b"response.output_text.delta", delta_template % (text, seq)))
                seq += 1
                self.deltas_sent += 1
                if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    await writer.drain()
                elif rate <= 0 and k % 64 == 63:
                    await asyncio.sleep(0)  # full rate: still let the other streams run
            text = b"".join(texts).decode()
            done_part = {**part, "text": text}
            done_item = {**item, "status": "completed", "content": [done_part]}
            completed = {**response, "status": "completed", "completed_at": int(time.time()), "output": [done_item],
                         "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                                   "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                                   "total_tokens": 10 + n}}
            writer.write(
                event("response.output_text.done", content_index=0, **where, logprobs=[], text=text)
                + event("response.content_part.done", content_index=0, **where, part=done_part)
                + event("response.output_item.done", item=done_item, output_index=0)
                + event("response.completed", response=completed)
                + b"0\r\n\r\n"
            )
            await writer.drain()
        finally:
            self.open_streams -= 1


async def serve(host: str, port: int) -> None:
    upstream = FastUpstream()
    server = await asyncio.start_server(upstream.handle, host, port, backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed as `PORT <n>`)")
    args = parser.parse_args()
    raise_fd_limit()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
