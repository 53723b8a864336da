"""The default engine: OpenAI's Responses API, with a Conversation holding each thread.

Every call this engine makes to OpenAI is in this module. A turn is one or more responses on
the thread's conversation: the first carries the user's message, each next one carries the
outputs of the function calls the previous one made.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import openai
import orjson

from .config import Settings
from .errors import NotFound
from .message_parser import MessageParser, ToolTracker
from .timeouts import MoveOn
from .tool_executor import ToolRegistry, ToolResult
from .upstream import call_with_retries, error_message, is_thread_busy, map_upstream_error, may_have_taken_effect
from .upstream_sse import DeliverEvents, OnBatch, SSEEventReader
from .upstream_transport import ResponseBody

logger = logging.getLogger("assistant.responses")

DRAIN_SECONDS = 0.5  # how long to wait for the end of a body whose last event came
# Each refusal of a turn's input names one call an interrupted turn left unanswered, and a
# round can make many calls at once (parallel tool calls): answer up to this many.
MAX_REPAIRS = 64
# After a 5xx, how far back (newest first) the conversation is searched for the turn's input:
# one page, as much as the API gives (a turn of many parallel tool calls makes many items).
LOOK_BACK_ITEMS = 100
# Threads whose undelivered tool outputs are kept for their next message, at most (the oldest
# go first: a call left without output is answered "interrupted" by `repair_input` instead).
MAX_HELD_THREADS = 10_000
# How long a stopped turn may spend reading the conversation back to see what it took.
READ_BACK_ON_CANCEL_SECONDS = 5.0


def user_message_item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def tool_output_item(result: ToolResult) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": result.tool_call_id, "output": result.output}


def _has_outputs(items: list[dict[str, Any]]) -> bool:
    return any(i.get("type") == "function_call_output" for i in items)


def undeliverable(items: list[dict[str, Any]], reason: str) -> list[dict[str, Any]] | None:
    """The input with each tool output the upstream refused replaced by a short error saying so
    (None: nothing to replace). A 400 is the same for the same input, so the outputs as they are
    would be refused with every later message of the thread."""
    if not _has_outputs(items):
        return None
    error = orjson.dumps({"error": f"the tool's output could not be delivered: {reason}"}).decode()
    return [{**i, "output": error} if i.get("type") == "function_call_output" else i for i in items]


_MISSING_OUTPUT = re.compile(r"No tool output found for function call (\S+?)\.?$")
_UNKNOWN_CALL = re.compile(r"No tool call found for function call output with call_id (\S+?)\.?$")


def repair_input(exc: BaseException, items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The input fixed for a thread left inconsistent by an earlier, interrupted turn.

    The upstream refuses new input while a function call of the conversation has no output
    (a turn died between the call and its output), and refuses outputs for calls it does not
    know. Either way the fix is in our input: answer the orphan call, or drop the stray output.
    """
    if not isinstance(exc, openai.BadRequestError):
        return None
    message = error_message(exc)
    if match := _MISSING_OUTPUT.search(message):
        orphan = {"type": "function_call_output", "call_id": match[1],
                  "output": '{"error": "the turn that made this call was interrupted"}'}
        return [orphan, *items]
    if match := _UNKNOWN_CALL.search(message):
        kept = [i for i in items if i.get("call_id") != match[1]]
        return kept if len(kept) < len(items) else None
    return None


def _item_matches(stored: dict[str, Any], sent: dict[str, Any]) -> bool:
    """Whether an item read back from the conversation is the one we sent."""
    if sent.get("type") == "function_call_output":
        return stored.get("type") == "function_call_output" and stored.get("call_id") == sent["call_id"]
    if stored.get("type") != "message" or stored.get("role") != "user":
        return False
    text = "".join(p.get("text", "") for p in stored.get("content") or () if isinstance(p, dict))
    return text == sent["content"][0]["text"]


def _comes_before(stored: dict[str, Any], sent: dict[str, Any]) -> bool:
    """Whether an item read back from the conversation would be older than the one we sent:
    the call our output answers, or an earlier turn's message."""
    if sent.get("type") == "function_call_output":
        return stored.get("type") == "function_call" and stored.get("call_id") == sent["call_id"]
    return stored.get("type") == "message" and stored.get("role") == "user"


class ResponsesEngine:
    name = "responses"

    def __init__(self, client: openai.AsyncOpenAI, settings: Settings, registry: ToolRegistry) -> None:
        self.client = client
        self.settings = settings
        # Everything but the conversation and the input is the same for every response.
        # "auto": a conversation outgrowing the model's context window loses its oldest items
        # instead of having every later message refused (OpenAI's default, "disabled").
        self._base_params: dict[str, Any] = {"model": settings.openai_model, "truncation": settings.truncation}
        if settings.instructions:
            self._base_params["instructions"] = settings.instructions
        if registry.responses_tools:
            self._base_params["tools"] = registry.responses_tools
        # The streaming create is the one upstream call of every turn: it is built once here and
        # goes straight to the connection pool (the SDK's and httpx's request building, cookie
        # jar and hooks cost ~1 ms per turn). The SDK still gives its headers and error types.
        self._http: httpx.AsyncClient = client._client
        self._responses_url = httpx.URL(str(client.base_url.join("responses")))  # also under a bare host
        self._timeout = self._http.timeout.as_dict()
        self._headers = httpx.Headers({
            name: value
            for name, value in {**client.auth_headers, **client.default_headers, "Accept": "text/event-stream"}.items()
            if isinstance(value, str)
        })
        # Outputs of function calls that could not be delivered (the follow-up failed): they are
        # sent with the thread's next message, since the upstream refuses new input until then.
        self._undelivered: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    async def create_thread(self) -> str:
        try:
            conversation = await call_with_retries(
                self.client.conversations.create,
                max_retries=self.settings.upstream_max_retries,
                what="conversations.create",
                # A duplicate empty conversation harms nothing, so 5xx is safe to retry.
                retry_if=_always,
            )
        except Exception as exc:
            raise map_upstream_error(exc) from exc
        return conversation.id

    def new_parser(self, tracker: ToolTracker) -> MessageParser:
        return MessageParser(tracker)

    def first_input(self, thread_id: str, message: str) -> list[dict[str, Any]]:
        return [*self._undelivered.pop(thread_id, ()), user_message_item(message)]

    def next_input(self, parser: MessageParser, results: list[ToolResult]) -> list[dict[str, Any]]:
        return [tool_output_item(r) for r in results]

    async def abandon_round(self, thread_id: str, parser: MessageParser, results: list[ToolResult]) -> None:
        """Hold the outputs of the round's calls, to send them before the thread's next message.

        A response cut off mid-way needs nothing: it ends upstream by itself, and a call it
        stored without output is answered by `repair_input` when the next message is refused.
        """
        if parser.completed:
            self._hold(thread_id, [tool_output_item(r) for r in results])

    def _hold(self, thread_id: str, items: list[dict[str, Any]]) -> None:
        outputs = [i for i in items if i.get("type") == "function_call_output"]
        if outputs:
            self._undelivered.setdefault(thread_id, []).extend(outputs)
            self._undelivered.move_to_end(thread_id)
            while len(self._undelivered) > MAX_HELD_THREADS:
                dropped, _ = self._undelivered.popitem(last=False)
                logger.warning("dropping the undelivered tool outputs of thread %s (MAX_HELD_THREADS)", dropped)

    def open_round(self, thread_id: str, items: list[dict[str, Any]]) -> Round:
        """Create a streamed response on the thread and give its events, in batches."""
        return Round(self, thread_id, items)

    async def _create_response(self, thread_id: str, items: list[dict[str, Any]]) -> httpx.Response:
        """The streamed response, through retries and repairs. A method of its own, so that
        nothing of the request (its parameters, the retry closures) stays alive while the
        response streams: an idle stream holds ~0.6 KiB less."""
        params = {**self._base_params, "conversation": thread_id, "input": items}
        # A thread the upstream still holds (a dropped client's response) is retried for as long
        # as a turn may wait for a thread.
        deadline = anyio.current_time() + self.settings.thread_lock_timeout_seconds
        sent = items
        repairs = 0
        replaced = False  # the tool outputs were refused once, and replaced by errors

        taken: bool | None = None  # after a 5xx: whether the conversation holds our input
        checked: BaseException | None = None  # the failure `taken` was read back for
        doubtful: BaseException | None = None  # a failure of this turn that may have taken the input
        in_flight = False  # a request is out (a cancel then leaves it unknown whether it went in)

        async def create() -> httpx.Response:
            nonlocal in_flight
            in_flight = True  # and it stays so if the request is cancelled while it is out
            try:
                response = await self._create_streaming_response(params)
            except Exception:
                in_flight = False
                raise
            in_flight = False
            return response

        async def not_applied(exc: BaseException) -> bool:
            nonlocal taken, checked, doubtful
            doubtful = checked = exc
            taken = await self._input_taken(thread_id, sent)
            return taken is False

        try:
            while True:
                taken = checked = None
                try:
                    return await call_with_retries(
                        create,
                        max_retries=self.settings.upstream_max_retries,
                        what="responses.create",
                        retry_if=not_applied,
                    )
                except Exception as exc:
                    repaired = repair_input(exc, params["input"])
                    if repaired is not None and repairs < MAX_REPAIRS:
                        logger.warning("repairing the thread's unanswered tool calls before retrying")
                        params["input"] = sent = repaired
                        repairs += 1
                        continue
                    busy = is_thread_busy(exc)
                    if busy:
                        # The upstream is finishing an earlier response on this conversation:
                        # maybe the one an earlier failed attempt of this turn started.
                        waiting = anyio.current_time() < deadline
                        if waiting:
                            logger.info("thread busy upstream; waiting to retry")
                            await anyio.sleep(1.0)
                        if doubtful is not None:
                            taken = await self._input_taken(thread_id, sent)
                            if taken is not False:
                                exc, waiting = doubtful, False  # it went in (or may have): not sent again
                        if waiting:
                            continue
                    elif isinstance(exc, openai.BadRequestError) and not replaced:
                        # Refused as they are (over 10 MiB, over the context window): the model is
                        # told instead, in this turn, and nothing unsendable waits for the next one.
                        replacement = undeliverable(params["input"], error_message(exc))
                        if replacement is not None:
                            logger.warning("the upstream refused the tool outputs (%s): sending errors in their place",
                                           error_message(exc))
                            params["input"] = sent = replacement
                            replaced = True
                            continue
                    elif checked is not exc and may_have_taken_effect(exc) and _has_outputs(params["input"]):
                        taken = await self._input_taken(thread_id, sent)  # the last attempt's failure
                    error = map_upstream_error(exc, thread_id=thread_id)
                    gone = isinstance(error, NotFound) and error.type == "thread_not_found"
                    if not taken and not gone:  # outputs the conversation already holds are not sent again
                        self._hold(thread_id, params["input"])
                    raise error from exc
        except anyio.get_cancelled_exc_class():
            # Stopped (the client's cancel, the shutdown) before the upstream answered: the tool
            # outputs are kept for the thread's next message, unless the conversation took them.
            if _has_outputs(params["input"]):
                taken = None
                if in_flight or doubtful is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(READ_BACK_ON_CANCEL_SECONDS):
                        taken = await self._input_taken(thread_id, sent)
                if not taken:  # unknown is held, as after a failure
                    self._hold(thread_id, params["input"])
            raise

    async def _create_streaming_response(self, params: dict[str, Any]) -> httpx.Response:
        """POST /responses with `stream: true`; failures raise the SDK's own exceptions."""
        request = httpx.Request(
            "POST", self._responses_url, headers=self._headers, content=orjson.dumps({**params, "stream": True}),
            extensions={"timeout": self._timeout},
        )
        try:
            # The client's transport for the URL: the proxy's when one is set (and respx's in tests).
            transport = self._http._transport_for_url(self._responses_url)
            response = await transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            raise openai.APITimeoutError(request=request) from exc  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise openai.APIConnectionError(request=request) from exc  # type: ignore[arg-type]
        if not 200 <= response.status_code < 300:  # a redirect is no stream either
            response.request = request  # for the SDK's error (a stream does not keep the body it sent)
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise self.client._make_status_error_from_response(response)  # type: ignore[arg-type]
        return response

    async def _input_taken(self, thread_id: str, items: list[dict[str, Any]]) -> bool | None:
        """After a 5xx: whether the conversation took our input (None: cannot tell), so that a
        retry never sends it twice.

        A conversation takes a response's input and its output items together, so our input
        may sit under the response's outputs: it is looked for among the newest items, back to
        the item it would follow. (An earlier turn with the very same message reads as ours: the
        turn then fails instead of sending the message twice.)
        """
        try:
            page = await self.client.conversations.items.list(thread_id, limit=LOOK_BACK_ITEMS, order="desc")
        except Exception:
            return None
        sent = items[-1]
        for item in page.data:
            stored = item.model_dump()
            if _item_matches(stored, sent):
                return True
            if _comes_before(stored, sent):
                return False
        return False if len(page.data) < LOOK_BACK_ITEMS else None  # False: the whole conversation was read


class Round:
    """One round's streamed response, as `async with`: it gives `deliver`, which hands the
    events to the orchestrator's handler in batches; on a normal end the body is read to its
    end (so the connection goes back to the pool instead of being dropped: no new TLS
    handshake), and the response is closed however the round ends. A class, not an
    `asynccontextmanager`: an idle stream holds no generator, context manager object and entry
    in the loop's set of async generators for it (~0.5 KiB)."""

    __slots__ = ("_engine", "_thread_id", "_items", "_response", "_chunks")

    def __init__(self, engine: ResponsesEngine, thread_id: str, items: list[dict[str, Any]]) -> None:
        self._engine = engine
        self._thread_id = thread_id
        self._items = items
        self._chunks: AsyncIterator[bytes] | None = None

    async def __aenter__(self) -> DeliverEvents:
        self._response = await self._engine._create_response(self._thread_id, self._items)
        del self._items  # sent: not kept while the round streams and its tools run
        return self.deliver

    async def deliver(self, on_batch: OnBatch) -> None:
        """The round's events to `on_batch`, a batch per network read, until it returns True or
        the body ends. From the service's own transport they go from the connection's read
        callback straight to `on_batch`: no task wakes per delta. From any other (httpx's,
        behind a proxy; respx's in tests), or with a content coding to undo, they are read here."""
        on_chunk = SSEEventReader(on_batch)
        body = self._response.stream
        try:
            if isinstance(body, ResponseBody) and "content-encoding" not in self._response.headers:
                await body.deliver(on_chunk)
                return
            self._chunks = _body_chunks(self._response)
            async for chunk in self._chunks:
                if on_chunk(chunk):
                    return
                del chunk  # an idle stream holds no chunk (a `response.created` echoes the request)
        except httpx.TransportError as exc:  # cut off (RemoteProtocolError, ReadError) or silent (ReadTimeout)
            raise map_upstream_error(exc) from exc

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc_type is None:
                chunks = self._chunks or _body_chunks(self._response)
                async with MoveOn(time.monotonic() + DRAIN_SECONDS):
                    try:
                        async for _ in chunks:
                            pass
                    except httpx.HTTPError:
                        pass  # the response is complete; the connection is just not reused
        finally:
            self._chunks = None
            with anyio.CancelScope(shield=True):  # also when the run is being cancelled
                await self._response.aclose()
            del self._response  # `deliver`, which the caller may still hold, keeps this round


def _body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """One iterator over the body as the transport hands it over (the events, then the drain).

    No content coding is asked for, so none is expected; httpx's `aiter_bytes()` would add two
    generators that keep the last chunk alive while they wait: an idle stream's
    `response.created`, echoing the request, ~2 KiB each (httpx's transport, used behind a
    proxy, keeps it)."""
    if "content-encoding" in response.headers:
        return response.aiter_bytes()
    return aiter(cast(httpx.AsyncByteStream, response.stream))


async def _always(exc: BaseException) -> bool:
    return True
