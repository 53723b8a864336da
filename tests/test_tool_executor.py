from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import orjson
import pydantic
import pytest

from assistant import example_tools, tool_executor
from assistant.example_tools import calculator, get_current_time, roll_dice
from assistant.logs import JsonFormatter
from assistant.tool_executor import (
    ToolCall,
    ToolConfigError,
    ToolRegistry,
    ToolResult,
    execute_tool,
    load_tool_map,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def examples() -> ToolRegistry:
    return ToolRegistry(example_tools.TOOL_MAP, timeout=5)


async def run(registry: ToolRegistry, name: str, arguments: str, correlation_id: str = "corr-1") -> ToolResult:
    return await execute_tool(registry, ToolCall("call_1", name, arguments), correlation_id=correlation_id)


def error_of(result: ToolResult, correlation_id: str = "corr-1") -> str:
    """Assert ``result`` is a well-formed error result and return its message."""
    assert result.is_error is True
    assert result.tool_call_id == "call_1"
    payload = orjson.loads(result.output)
    assert set(payload) == {"error", "correlation_id"}
    assert payload["correlation_id"] == correlation_id
    assert "Traceback" not in payload["error"]
    return payload["error"]


def tool_schema(registry: ToolRegistry, name: str) -> dict[str, Any]:
    return next(tool for tool in registry.responses_tools if tool["name"] == name)


# --- schemas -------------------------------------------------------------------


def test_calculator_schema(examples: ToolRegistry) -> None:
    assert tool_schema(examples, "calculator") == {
        "type": "function",
        "name": "calculator",
        "description": (
            "Calculate an exact result of an arithmetic operation on two numbers. "
            "Use this instead of doing arithmetic in your head."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "number", "description": "The first operand."},
                "b": {"type": "number", "description": "The second operand."},
                "op": {
                    "type": "string",
                    "enum": ["add", "subtract", "multiply", "divide", "power"],
                    "description": "The operation to apply: a + b, a - b, a * b, a / b or a raised to the power b.",
                },
            },
            "required": ["a", "b", "op"],
            "additionalProperties": False,
        },
        "strict": False,
    }


def test_get_current_time_schema(examples: ToolRegistry) -> None:
    tool = tool_schema(examples, "get_current_time")
    assert tool["description"] == "Get the current date and time in a time zone, as ISO 8601 with UTC offset."
    assert tool["parameters"] == {
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "default": "UTC",
                "description": 'An IANA time zone name, such as "Europe/Paris" or "America/New_York".',
            }
        },
        "required": [],
        "additionalProperties": False,
    }


def test_roll_dice_schema(examples: ToolRegistry) -> None:
    tool = tool_schema(examples, "roll_dice")
    assert tool["description"] == "Roll one or more fair dice and report each roll and their total."
    assert tool["parameters"] == {
        "type": "object",
        "properties": {
            "sides": {
                "type": "integer",
                "default": 6,
                "minimum": 2,
                "maximum": 1000,
                "description": "Number of faces on each die.",
            },
            "count": {
                "type": "integer",
                "default": 1,
                "minimum": 1,
                "maximum": 100,
                "description": "How many dice to roll.",
            },
        },
        "required": [],
        "additionalProperties": False,
    }


def test_registry_names_and_assistants_format(examples: ToolRegistry) -> None:
    assert examples.names == ("calculator", "get_current_time", "roll_dice")
    assert examples.timeout == 5
    assert [tool["name"] for tool in examples.responses_tools] == list(examples.names)
    for responses, assistants in zip(examples.responses_tools, examples.assistants_tools, strict=True):
        assert assistants == {
            "type": "function",
            "function": {
                "name": responses["name"],
                "description": responses["description"],
                "parameters": responses["parameters"],
            },
        }


def test_annotated_field_description_and_docstring_sections() -> None:
    def search(
        query: Annotated[str, pydantic.Field(description="What to look for.")],
        limit: Annotated[int, pydantic.Field(ge=1, description="From Field.")] = 10,
        title: str = "",
    ) -> list[str]:
        """Search the
        knowledge base.

        Args:
            limit (int): From the docstring, which
                loses to the Field description.
            title: Only documents with this
                title; an empty string matches all.

        Returns:
            Matching document ids.
        """
        return []

    parameters = tool_schema(ToolRegistry({"search": search}, timeout=1), "search")
    assert parameters["description"] == "Search the knowledge base."
    assert parameters["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "minimum": 1, "default": 10, "description": "From Field."},
            # A property called "title" survives the removal of pydantic's titles.
            "title": {
                "type": "string",
                "default": "",
                "description": "Only documents with this title; an empty string matches all.",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    }


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(pydantic.BaseModel):
    x: int
    y: int


def test_nested_model_and_enum_keep_defs_without_titles() -> None:
    def paint(at: Point, colour: Colour, mode: Literal["fill", "stroke"] = "fill") -> str:
        """Paint a point."""
        return "ok"

    parameters = ToolRegistry({"paint": paint}, timeout=1).responses_tools[0]["parameters"]
    assert parameters["properties"]["at"] == {"$ref": "#/$defs/Point"}
    assert parameters["properties"]["colour"] == {"$ref": "#/$defs/Colour"}
    assert parameters["properties"]["mode"] == {"type": "string", "enum": ["fill", "stroke"], "default": "fill"}
    assert parameters["$defs"]["Colour"] == {"type": "string", "enum": ["red", "blue"]}
    assert parameters["$defs"]["Point"]["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer"}}
    assert "title" not in orjson.dumps(parameters).decode()
    assert parameters["required"] == ["at", "colour"]
    assert parameters["additionalProperties"] is False


def test_no_parameters_and_no_docstring() -> None:
    def ping() -> str:
        return "pong"

    tool = ToolRegistry({"ping": ping}, timeout=1).responses_tools[0]
    assert tool["description"] == ""
    assert tool["parameters"] == {"type": "object", "properties": {}, "required": [], "additionalProperties": False}


# --- registry validation -------------------------------------------------------


def _ok(x: int) -> int:
    return x


@pytest.mark.parametrize("name", ["", "has space", "dotted.name", "x" * 65, "émoji", 3])
def test_registry_rejects_bad_names(name: Any) -> None:
    with pytest.raises(ToolConfigError, match="invalid tool name"):
        ToolRegistry({name: _ok}, timeout=1)


def test_registry_accepts_edge_names() -> None:
    assert ToolRegistry({"a-b_C9": _ok, "x" * 64: _ok}, timeout=1).names == ("a-b_C9", "x" * 64)


def test_registry_rejects_non_callable() -> None:
    with pytest.raises(ToolConfigError, match="'broken'.*not callable"):
        ToolRegistry({"broken": 42}, timeout=1)  # type: ignore[dict-item]


def test_registry_rejects_var_args() -> None:
    def star(*values: int) -> int:
        return sum(values)

    def double_star(**options: str) -> str:
        return ""

    with pytest.raises(ToolConfigError, match="'star'.*values"):
        ToolRegistry({"star": star}, timeout=1)
    with pytest.raises(ToolConfigError, match="'double_star'.*options"):
        ToolRegistry({"double_star": double_star}, timeout=1)


def test_registry_rejects_positional_only() -> None:
    def positional(x: int, /) -> int:
        return x

    with pytest.raises(ToolConfigError, match="'positional'.*positional-only.*'x'"):
        ToolRegistry({"positional": positional}, timeout=1)


def test_registry_rejects_missing_annotation() -> None:
    def untyped(x: int, y) -> int:  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(ToolConfigError, match="'untyped'.*'y'.*type hint"):
        ToolRegistry({"untyped": untyped}, timeout=1)


def test_registry_rejects_types_pydantic_cannot_handle() -> None:
    def uses_opaque(thing: Opaque) -> str:
        return ""

    with pytest.raises(ToolConfigError, match="'uses_opaque': cannot build an argument schema"):
        ToolRegistry({"uses_opaque": uses_opaque}, timeout=1)


def test_registry_rejects_a_schema_that_cannot_be_sent_as_json() -> None:
    def huge_default(count: int = 2**70) -> int:
        return count

    with pytest.raises(ToolConfigError, match="'huge_default': its argument schema cannot be sent as JSON: .*64-bit"):
        ToolRegistry({"huge_default": huge_default}, timeout=1)


def test_registry_rejects_unresolvable_annotation() -> None:
    def forward(thing: NotDefinedAnywhere) -> str:  # type: ignore[name-defined]  # noqa: F821
        return ""

    with pytest.raises(ToolConfigError, match="'forward': cannot read its signature: NameError"):
        ToolRegistry({"forward": forward}, timeout=1)


def test_registry_rejects_non_positive_timeout() -> None:
    with pytest.raises(ToolConfigError, match="timeout"):
        ToolRegistry({}, timeout=0)


# --- load_tool_map -------------------------------------------------------------


@pytest.fixture
def tool_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module under tmp_path and make it importable; forget it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_load_tool_map_default() -> None:
    for default in (None, ""):
        tool_map = load_tool_map(default)
        assert tool_map == example_tools.TOOL_MAP
        assert tool_map is not example_tools.TOOL_MAP


def test_load_tool_map_from_module(tool_module) -> None:
    name = tool_module(
        "tmp_good_tools",
        "def shout(text: str) -> str:\n    return text.upper()\n\nTOOL_MAP = {'shout': shout}\n",
    )
    tool_map = load_tool_map(name)
    assert list(tool_map) == ["shout"]
    assert tool_map["shout"]("hi") == "HI"


def test_load_tool_map_missing_module() -> None:
    with pytest.raises(ToolConfigError, match="cannot import tool module 'no_such_tools_module'"):
        load_tool_map("no_such_tools_module")


def test_load_tool_map_module_failing_on_import(tool_module) -> None:
    name = tool_module("tmp_broken_tools", "raise RuntimeError('boom')\n")
    with pytest.raises(ToolConfigError, match="cannot import tool module 'tmp_broken_tools': RuntimeError: boom"):
        load_tool_map(name)


def test_load_tool_map_without_tool_map(tool_module) -> None:
    name = tool_module("tmp_no_map_tools", "X = 1\n")
    with pytest.raises(ToolConfigError, match="'tmp_no_map_tools' has no TOOL_MAP"):
        load_tool_map(name)


def test_load_tool_map_not_a_dict(tool_module) -> None:
    name = tool_module("tmp_list_map_tools", "TOOL_MAP = [print]\n")
    with pytest.raises(ToolConfigError, match="must be a dict.*got list"):
        load_tool_map(name)


# --- example tools called directly ---------------------------------------------


def test_calculator() -> None:
    assert calculator(19, 3, "multiply") == 57
    assert type(calculator(19, 3, "multiply")) is int
    assert calculator(7, 2, "divide") == 3.5
    assert calculator(0.1, 0.2, "add") == pytest.approx(0.3)
    assert calculator(1, 3, "subtract") == -2
    assert calculator(2, 10, "power") == 1024
    with pytest.raises(ValueError, match="cannot divide 5 by zero"):
        calculator(5, 0, "divide")
    with pytest.raises(ValueError, match="too large"):
        calculator(10, 1000, "power")
    with pytest.raises(ValueError, match="not a real number"):
        calculator(-8, 0.5, "power")


def test_get_current_time() -> None:
    utc = datetime.fromisoformat(get_current_time())
    assert utc.utcoffset() is not None and utc.utcoffset().total_seconds() == 0
    kolkata = datetime.fromisoformat(get_current_time("Asia/Kolkata"))
    assert kolkata.utcoffset().total_seconds() == 5.5 * 3600
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        get_current_time("Mars/Olympus")


def test_roll_dice() -> None:
    result = roll_dice(sides=20, count=50)
    assert len(result["rolls"]) == 50
    assert all(1 <= roll <= 20 for roll in result["rolls"])
    assert result["total"] == sum(result["rolls"])


# --- execute_tool: success -----------------------------------------------------


@pytest.mark.anyio
async def test_calculator_call_like_recorded_stream(examples: ToolRegistry) -> None:
    result = await run(examples, "calculator", '{"a":19,"b":3,"op":"multiply"}')
    assert result == ToolResult(tool_call_id="call_1", output="57", is_error=False)


@pytest.mark.anyio
async def test_lax_coercion(examples: ToolRegistry) -> None:
    result = await run(examples, "calculator", '{"a":"7","b":2,"op":"divide"}')
    assert result.output == "3.5" and not result.is_error


@pytest.mark.anyio
async def test_lax_takes_true_for_one_and_a_strict_parameter_does_not() -> None:
    """README: lax by default, as pydantic is; a strict parameter takes only its own JSON type."""

    def lax(count: int) -> int:
        return count

    def strict(count: pydantic.StrictInt) -> int:
        return count

    registry = ToolRegistry({"lax": lax, "strict": strict}, timeout=5)
    assert (await run(registry, "lax", '{"count": true}')).output == "1"
    assert error_of(await run(registry, "strict", '{"count": true}')) == (
        "invalid arguments for tool 'strict': count: Input should be a valid integer")
    assert (await run(registry, "strict", '{"count": 3}')).output == "3"


@pytest.mark.anyio
async def test_empty_arguments_mean_no_arguments(examples: ToolRegistry) -> None:
    result = await run(examples, "roll_dice", "")
    assert not result.is_error
    payload = orjson.loads(result.output)
    assert len(payload["rolls"]) == 1 and payload["total"] == payload["rolls"][0]


@pytest.mark.anyio
async def test_string_result_is_returned_as_is(examples: ToolRegistry) -> None:
    result = await run(examples, "get_current_time", '{"timezone": "Europe/Paris"}')
    assert not result.is_error
    assert datetime.fromisoformat(result.output).utcoffset() is not None


@pytest.mark.anyio
async def test_async_tool_is_awaited_on_the_event_loop() -> None:
    async def where(delay: float) -> int:
        await anyio.sleep(delay)
        return threading.get_ident()

    result = await run(ToolRegistry({"where": where}, timeout=5), "where", '{"delay": 0.01}')
    assert result.is_error is False
    assert int(result.output) == threading.get_ident()


@pytest.mark.anyio
async def test_sync_tool_runs_in_worker_thread() -> None:
    def where() -> int:
        return threading.get_ident()

    result = await run(ToolRegistry({"where": where}, timeout=5), "where", "{}")
    assert result.is_error is False
    assert int(result.output) != threading.get_ident()


@pytest.mark.anyio
async def test_async_callable_instance_is_awaited() -> None:
    class Echo:
        """Echo text back."""

        async def __call__(self, text: str) -> str:
            return text

    result = await run(ToolRegistry({"echo": Echo()}, timeout=5), "echo", '{"text": "hi"}')
    assert result == ToolResult("call_1", "hi", False)


@dataclass
class Money:
    amount: int
    currency: str


class Weather(pydantic.BaseModel):
    city: str
    when: datetime


class Opaque:
    def __str__(self) -> str:
        return "<opaque thing>"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": [1, 2.5, None, True]}, '{"a":[1,2.5,null,true]}'),
        ([1, "two"], '[1,"two"]'),
        (None, "null"),
        (42, "42"),
        (False, "false"),
        (Money(3, "EUR"), '{"amount":3,"currency":"EUR"}'),
        (Weather(city="Oslo", when=datetime(2024, 1, 2, 3, 4, 5)), '{"city":"Oslo","when":"2024-01-02T03:04:05"}'),
        ({"thing": Opaque()}, '{"thing":"<opaque thing>"}'),
        ({1: "one"}, '{"1":"one"}'),
    ],
)
async def test_non_string_results_are_json_encoded(value: Any, expected: str) -> None:
    def produce() -> Any:
        return value

    result = await run(ToolRegistry({"produce": produce}, timeout=5), "produce", "{}")
    assert result == ToolResult("call_1", expected, False)


class Status(enum.Enum):
    SHIPPED = "shipped"


@dataclass
class Order:
    id: str
    status: Status
    placed: datetime
    lines: dict[Any, int]
    _cache: int = 0  # orjson leaves out a dataclass's private fields


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    [
        Order("ORD1", Status.SHIPPED, datetime(2024, 5, 1, 12, 30, 0, 123), {Status.SHIPPED: 1, 7: 2, None: 3, True: 4}),
        [Money(3, "EUR"), Weather(city="Oslo", when=datetime(2024, 1, 2)), Opaque(), float("nan"), (1, "two")],
        {datetime(2024, 1, 2).date(): "a date key", uuid.UUID(int=5): "a UUID key", 1.5: "a float key"},
    ],
    ids=["dataclass, enum, datetime, keys", "model, opaque, NaN, tuple", "keys"],
)
async def test_a_result_reads_the_same_whether_or_not_orjson_can_encode_all_of_it(value: Any) -> None:
    """orjson refuses an integer past 64 bits (or a lone surrogate, or nesting past 254) anywhere
    in a result, and the standard library's encoder takes the whole result over: what orjson
    knows must come out the same, not as Python's reprs."""

    def alone() -> Any:
        return value

    def beside_a_big_integer() -> Any:
        return {"value": value, "big": 2**70}

    registry = ToolRegistry({"alone": alone, "beside_a_big_integer": beside_a_big_integer}, timeout=5)
    encoded = (await run(registry, "alone", "{}")).output
    both = await run(registry, "beside_a_big_integer", "{}")
    assert not both.is_error
    assert both.output == '{"value": %s, "big": %d}' % (json.dumps(json.loads(encoded), ensure_ascii=False), 2**70)


@pytest.mark.anyio
async def test_a_dict_keyed_by_what_json_does_not_know_is_sent_with_the_keys_str() -> None:
    def distances() -> dict[tuple[str, str], int]:
        """Distances between pairs of cities."""
        return {("Paris", "Lyon"): 465, ("Lyon", "Nice"): 470}

    result = await run(ToolRegistry({"distances": distances}, timeout=5), "distances", "{}")
    assert result == ToolResult("call_1", '{"(\'Paris\', \'Lyon\')": 465, "(\'Lyon\', \'Nice\')": 470}', False)


@pytest.mark.anyio
async def test_parameters_named_like_basemodel_attributes() -> None:
    def query(schema: str, json: bool = False, _private: int = 0) -> str:
        return f"{schema}:{json}:{_private}"

    registry = ToolRegistry({"query": query}, timeout=5)
    assert list(registry.responses_tools[0]["parameters"]["properties"]) == ["schema", "json", "_private"]
    result = await run(registry, "query", '{"schema": "public", "json": true, "_private": 3}')
    assert result.output == "public:True:3"


@pytest.mark.anyio
async def test_success_logged_at_debug_only(examples: ToolRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="assistant.tools")
    await run(examples, "calculator", '{"a":1,"b":2,"op":"add"}')
    records = [record for record in caplog.records if record.name == "assistant.tools"]
    assert [record.levelno for record in records] == [logging.DEBUG]
    assert "calculator" in records[0].getMessage()
    assert records[0].tool == "calculator" and records[0].tool_call_id == "call_1"


# --- execute_tool: errors ------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_tool(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "launch_rockets", "{}"))
    assert "unknown tool 'launch_rockets'" in message
    assert "calculator" in message  # tells the model what it can call instead


@pytest.mark.anyio
async def test_invalid_json(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "calculator", '{"a": 1,', correlation_id="req-42"), "req-42")
    assert "not valid JSON" in message


@pytest.mark.anyio
@pytest.mark.parametrize(("arguments", "kind"), [("[1, 2]", "array"), ('"x"', "string"), ("null", "null"), ("3", "number")])
async def test_arguments_must_be_an_object(examples: ToolRegistry, arguments: str, kind: str) -> None:
    message = error_of(await run(examples, "calculator", arguments))
    assert message == f"arguments for tool 'calculator' must be a JSON object, got {kind}"


@pytest.mark.anyio
async def test_missing_argument(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "calculator", '{"a": 1, "op": "add"}'))
    assert message == "invalid arguments for tool 'calculator': b: Field required"


@pytest.mark.anyio
async def test_unknown_argument(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "calculator", '{"a": 1, "b": 2, "op": "add", "c": 3}'))
    assert message == "invalid arguments for tool 'calculator': c: Extra inputs are not permitted"


@pytest.mark.anyio
async def test_mistyped_arguments_are_all_listed(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "roll_dice", '{"sides": "abc", "count": 0}'))
    assert message.startswith("invalid arguments for tool 'roll_dice': ")
    assert "sides: Input should be a valid integer" in message
    assert "count: Input should be greater than or equal to 1" in message
    assert "input_value" not in message and "errors.pydantic.dev" not in message


@pytest.mark.anyio
async def test_literal_is_enforced(examples: ToolRegistry) -> None:
    message = error_of(await run(examples, "calculator", '{"a": 1, "b": 2, "op": "modulo"}'))
    assert "op: Input should be 'add', 'subtract', 'multiply', 'divide' or 'power'" in message


@pytest.mark.anyio
async def test_tool_exception(examples: ToolRegistry, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="assistant.tools")
    result = await run(examples, "calculator", '{"a": 5, "b": 0, "op": "divide"}', correlation_id="req-7")
    assert error_of(result, "req-7") == "ValueError: cannot divide 5 by zero"
    [record] = [record for record in caplog.records if record.name == "assistant.tools"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert record.tool == "calculator" and record.tool_call_id == "call_1"


@pytest.mark.anyio
async def test_async_tool_exception_and_own_timeout_error() -> None:
    async def fetch(url: str) -> str:
        raise TimeoutError(f"connect to {url} timed out")

    message = error_of(await run(ToolRegistry({"fetch": fetch}, timeout=5), "fetch", '{"url": "http://x"}'))
    # The tool's own TimeoutError is its error, not the executor's timeout.
    assert message == "TimeoutError: connect to http://x timed out"


@pytest.mark.anyio
async def test_exception_without_message() -> None:
    def fail() -> None:
        raise KeyError

    assert error_of(await run(ToolRegistry({"fail": fail}, timeout=5), "fail", "")) == "KeyError"


_release_sleepers = threading.Event()


@pytest.fixture(autouse=True)
def _wake_sleeping_threads() -> Any:
    """Abandoned worker threads end with the test instead of holding the process open."""
    _release_sleepers.clear()
    yield
    _release_sleepers.set()


def _sleep_sync() -> str:
    _release_sleepers.wait(5)
    return "woke"


async def _sleep_async() -> str:
    await anyio.sleep(5)
    return "woke"


@pytest.mark.anyio
@pytest.mark.parametrize("func", [_sleep_sync, _sleep_async], ids=["sync", "async"])
async def test_timeout(func: Any) -> None:
    registry = ToolRegistry({"slow": func}, timeout=0.2)
    start = time.monotonic()
    result = await run(registry, "slow", "{}")
    assert time.monotonic() - start < 1
    assert error_of(result) == "tool 'slow' timed out after 0.2 s"


@pytest.mark.anyio
@pytest.mark.parametrize("func", [_sleep_sync, _sleep_async], ids=["sync", "async"])
async def test_cancellation_propagates(func: Any) -> None:
    registry = ToolRegistry({"slow": func}, timeout=10)
    results: list[ToolResult] = []
    cancelled: list[bool] = []

    async def call() -> None:
        try:
            results.append(await run(registry, "slow", "{}"))
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert time.monotonic() - start < 1
    assert results == []
    assert cancelled == [True]


# --- whatever a tool does, only its own call fails --------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


class PickyNote(pydantic.BaseModel):
    text: str

    @pydantic.field_validator("text")
    @classmethod
    def check(cls, value: str) -> str:
        raise KeyError(value)  # pydantic turns only ValueError and AssertionError into its errors


def _raises(exc: BaseException) -> Any:
    def tool() -> None:
        raise exc

    return tool


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (_raises(SystemExit(3)), "SystemExit: 3"),  # argparse, click: a sync tool that exits
        (_raises(KeyboardInterrupt()), "KeyboardInterrupt"),
        (_raises(Unprintable()), "Unprintable"),
        (lambda: _deep(400), None),  # deeper than orjson encodes: the standard library does
        (lambda: _deep(5000), "ValueError: the tool's result cannot be sent as JSON: RecursionError"),
        (lambda: (n for n in range(3)), "ValueError: the tool returned a generator: return a value (a list, say)"),
    ],
    ids=["SystemExit", "KeyboardInterrupt", "unprintable exception", "deep result", "too deep result", "generator"],
)
async def test_what_a_tool_raises_or_returns_is_its_own_error(func: Any, expected: str | None) -> None:
    def tool() -> Any:
        return func()

    result = await run(ToolRegistry({"tool": tool}, timeout=5), "tool", "{}")
    if expected is None:
        assert result.is_error is False and result.output.startswith('{"a": {"a": ')
    else:
        assert error_of(result).startswith(expected), error_of(result)


@pytest.mark.anyio
@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_a_cancelled_error_a_tool_raises_itself_is_its_error_not_a_cancellation(is_async: bool) -> None:
    async def async_tool() -> None:
        raise anyio.get_cancelled_exc_class()()

    def sync_tool() -> None:
        raise anyio.get_cancelled_exc_class()()

    result = await run(ToolRegistry({"tool": async_tool if is_async else sync_tool}, timeout=5), "tool", "{}")
    assert error_of(result) == "CancelledError"


@pytest.mark.anyio
async def test_a_result_longer_than_the_upstream_takes_is_an_error_result() -> None:
    """OpenAI refuses any input string over 10 MiB (400 string_above_max_length): the model is told."""
    limit = 10_485_760

    def exactly_the_limit() -> str:
        """Return a long text."""
        return "x" * limit

    def one_more() -> str:
        """Return a longer text."""
        return "x" * (limit + 1)

    registry = ToolRegistry({"exactly_the_limit": exactly_the_limit, "one_more": one_more}, timeout=5)
    assert len((await run(registry, "exactly_the_limit", "{}")).output) == limit
    message = error_of(await run(registry, "one_more", "{}"))
    assert message == "tool 'one_more' returned 10485761 characters; at most 10485760 can be sent to the model"


@pytest.mark.anyio
async def test_an_error_quoting_its_whole_input_is_cut_after_its_masking() -> None:
    """An exception can quote megabytes (its whole input): the model, the clients and the run's
    bounded log get its first MAX_ERROR_CHARS characters; a key is masked before the cut."""
    limit = tool_executor.MAX_ERROR_CHARS
    key = "sk-proj-abcdefghijklmnop1234"

    def parse_report(path: str) -> None:
        """Parse a report."""
        raise ValueError(f"cannot parse {path}: {'x' * (limit - 60)}{key} {'y' * 100_000}")

    def short_error() -> None:
        """Fail briefly."""
        raise ValueError("x" * (limit - len("ValueError: ")))

    registry = ToolRegistry({"parse_report": parse_report, "short_error": short_error}, timeout=5)
    message = error_of(await run(registry, "parse_report", '{"path": "a.csv"}'))
    whole = f"ValueError: cannot parse a.csv: {'x' * (limit - 60)}[redacted] {'y' * 100_000}"
    assert message == f"{whole[:limit]}... ({len(whole) - limit} more characters)"
    assert "[redacted]" in message and "abcdefghijklmnop" not in message
    assert error_of(await run(registry, "short_error", "{}")) == "ValueError: " + "x" * (limit - len("ValueError: "))


@pytest.mark.anyio
async def test_a_validator_raising_something_else_than_a_value_error_is_an_error_result() -> None:
    def save(note: PickyNote) -> str:
        return "saved"

    assert error_of(await run(ToolRegistry({"save": save}, timeout=5), "save", '{"note": {"text": "x"}}')) == "KeyError: 'x'"


@pytest.mark.anyio
async def test_an_async_tool_behind_a_plain_decorator_is_awaited() -> None:
    async def fetch(url: str) -> str:
        return f"fetched {url}"

    @functools.wraps(fetch)
    def logged(*args: Any, **kwargs: Any) -> Any:  # returns the coroutine: a sync function to inspect
        return fetch(*args, **kwargs)

    logged.__signature__ = inspect.signature(fetch)  # type: ignore[attr-defined]
    result = await run(ToolRegistry({"fetch": logged}, timeout=5), "fetch", '{"url": "u"}')
    assert result == ToolResult("call_1", "fetched u", False)


@pytest.mark.anyio
async def test_a_field_default_in_the_signature_is_the_default() -> None:
    def scale(x: int = pydantic.Field(3, description="the x")) -> int:
        return x * 2

    registry = ToolRegistry({"scale": scale}, timeout=5)
    assert tool_schema(registry, "scale")["parameters"]["properties"] == {
        "x": {"default": 3, "description": "the x", "type": "integer"}}
    assert (await run(registry, "scale", "{}")).output == "6"
    assert (await run(registry, "scale", '{"x": 5}')).output == "10"


@pytest.mark.anyio
async def test_a_partials_bound_keywords_are_neither_shown_nor_settable() -> None:
    def search(query: str, api_key: str) -> str:
        return f"{query} with {api_key}"

    registry = ToolRegistry({"search": functools.partial(search, api_key="sk-live-SECRET123456")}, timeout=5)
    schema = orjson.dumps(tool_schema(registry, "search")).decode()
    assert "api_key" not in schema and "SECRET" not in schema
    assert (await run(registry, "search", '{"query": "q"}')).output == "q with sk-live-SECRET123456"
    assert "api_key" in error_of(await run(registry, "search", '{"query": "q", "api_key": "mine"}'))


@pytest.mark.anyio
async def test_a_partials_bound_values_are_masked_in_its_errors_and_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    """A key of any shape, bound with functools.partial, quoted by the tool's failure (an HTTP
    library's error names the URL, query string and all): neither the model, nor the client,
    nor the log sees it."""
    def weather(city: str, appid: str) -> str:
        raise RuntimeError(f"Client error '401' for url 'https://api.example/weather?q={city}&appid={appid}'")

    key = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    registry = ToolRegistry({"weather": functools.partial(weather, appid=key)}, timeout=5)
    with caplog.at_level(logging.INFO):
        message = error_of(await run(registry, "weather", '{"city": "Paris"}'))
    assert key not in message and "appid=[redacted]" in message and "q=Paris" in message
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "Client error" in logged and key not in logged


@pytest.mark.anyio
async def test_a_secret_in_a_tools_error_is_masked() -> None:
    def call_api() -> None:
        raise RuntimeError("401 for key sk-proj-abcdefghijklmnop1234")

    message = error_of(await run(ToolRegistry({"call_api": call_api}, timeout=5), "call_api", "{}"))
    assert "abcdefghijklmnop" not in message and "[redacted]" in message


@pytest.mark.anyio
async def test_sync_tools_run_in_daemon_threads_of_their_own_and_stuck_ones_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call past its timeout keeps its thread, which must neither hold the process at exit
    (anyio's pool threads would) nor let stuck calls pile up threads without end."""
    monkeypatch.setattr(tool_executor, "MAX_TOOL_THREADS", 2)
    started: list[threading.Thread] = []

    def hang() -> str:
        started.append(threading.current_thread())
        _release_sleepers.wait(5)
        return "woke"

    registry = ToolRegistry({"hang": hang}, timeout=0.2)
    results = [await run(registry, "hang", "{}") for _ in range(3)]
    assert [error_of(r) for r in results] == ["tool 'hang' timed out after 0.2 s"] * 3
    assert len(started) == 2 and all(t.daemon for t in started)  # the third found no free thread
    _release_sleepers.set()
    with anyio.fail_after(3):
        while registry.thread_slots.borrowed_tokens:  # the stuck calls gave their places back
            await anyio.sleep(0.01)
    _release_sleepers.clear()
    assert (await run(registry, "hang", "{}")).is_error is True  # and new calls run again
    assert len(started) == 3


def test_load_tool_map_module_exiting_on_import(tool_module) -> None:
    tool_module("exits_on_import", "import sys\nsys.exit('no config file')\n")
    with pytest.raises(ToolConfigError, match="cannot import tool module 'exits_on_import': SystemExit: no config file"):
        load_tool_map("exits_on_import")


# --- OpenAI's rules for function tools ---------------------------------------------------------


def _array_schemas_without_items(schema: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where OpenAI would answer "In context=(...), array schema missing items" (400)."""
    found: list[tuple[str, ...]] = []
    if isinstance(schema, dict):
        kind = schema.get("type")
        if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and "items" not in schema:
            found.append(path)
        for key, value in schema.items():
            if key in ("default", "enum", "const", "examples"):
                continue
            found += _array_schemas_without_items(value, (*path, key))
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found += _array_schemas_without_items(value, (*path, str(index)))
    return found


class _Box(pydantic.BaseModel):
    corner: tuple[int, int]


def _point(at: tuple[float, float]) -> str:
    """Mark a point."""
    return f"{at[0]} {at[1]}"


def _view(path: str, view_range: tuple[int, int] | None = None) -> str:
    """Show a file, or some of its lines."""
    return path


def _draw(box: _Box) -> str:
    """Draw a box."""
    return "ok"


@pytest.mark.anyio
@pytest.mark.parametrize("func", [_point, _view, _draw])
async def test_a_tuple_parameter_gives_every_array_schema_items(func: Any) -> None:
    """pydantic describes tuple[X, Y] with prefixItems and no items; OpenAI refuses such a tool
    on every request even with strict: false ("Invalid schema for function 'view': In
    context=('properties', 'view_range'), array schema missing items.")."""
    registry = ToolRegistry({"tool": func}, timeout=5)
    for tool in (registry.responses_tools[0]["parameters"], registry.assistants_tools[0]["function"]["parameters"]):
        assert _array_schemas_without_items(tool) == []
    if func is _point:  # validation still takes exactly two numbers
        assert (await run(registry, "tool", '{"at": [1, 2.5]}')).output == "1.0 2.5"
        assert "at" in error_of(await run(registry, "tool", '{"at": [1, 2, 3]}'))


def test_more_tools_than_openai_takes_fail_at_start_up() -> None:
    """An assistant (and a request) takes at most 128 tools; the 129th makes every run a 400."""
    many = {f"tool_{index}": _ok for index in range(129)}
    with pytest.raises(ToolConfigError, match="128"):
        ToolRegistry(many, timeout=1)


def test_a_description_longer_than_openai_takes_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    """OpenAI refuses a function description over 1024 characters
    ("Invalid 'tools[0].function.description': string too long...")."""
    def verbose(x: int) -> int:
        return x

    verbose.__doc__ = "Do a thing. " * 100  # 1,199 characters once joined
    with caplog.at_level(logging.WARNING, logger="assistant.tools"):
        registry = ToolRegistry({"verbose": verbose}, timeout=1)
    for description in (registry.responses_tools[0]["description"], registry.assistants_tools[0]["function"]["description"]):
        assert description == ("Do a thing. " * 100).strip()[:1024]
    assert "'verbose': its description (the docstring before Args:) has 1199 characters" in caplog.text


def test_a_partials_description_is_the_wrapped_functions() -> None:
    def search(query: str, api_key: str) -> str:
        """Search the web.

        Args:
            query: what to look for.
        """
        return query

    tool = ToolRegistry({"search": functools.partial(search, api_key="k")}, timeout=1).responses_tools[0]
    assert tool["description"] == "Search the web."
    assert tool["parameters"]["properties"]["query"] == {"type": "string", "description": "what to look for."}


@pytest.mark.anyio
async def test_a_none_default_takes_an_explicit_null() -> None:
    """`limit: int = None` is sent as {"type": "integer", "default": null}: the model is told null
    is the default, and the function is called with None when it is left out, yet a null the
    model sends is refused."""
    def search(query: str, limit: int = None) -> str:  # type: ignore[assignment]
        return f"{query} {limit}"

    registry = ToolRegistry({"search": search}, timeout=5)
    assert (await run(registry, "search", '{"query": "q"}')).output == "q None"
    result = await run(registry, "search", '{"query": "q", "limit": null}')
    assert result.is_error is False and result.output == "q None"


# --- what a user's own tools module writes ------------------------------------------------------


class _StrictBooking(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)

    when: datetime
    colour: Colour
    seats: tuple[int, int]


@pytest.mark.anyio
async def test_a_strict_pydantic_model_takes_the_json_the_model_sends() -> None:
    """The arguments are JSON, so they are validated as JSON: a strict model (or a field marked
    `Strict()`) takes a date as a string, an enum as its value and an array for a tuple. Validated
    as the Python objects orjson made of them, every one of those was refused ("Input should be
    an instance of Colour"), and the tool could never be called."""
    def book(booking: _StrictBooking, count: Annotated[int, pydantic.Strict()]) -> str:
        return f"{booking.when:%Y-%m-%d} {booking.colour.value} {booking.seats} x{count}"

    registry = ToolRegistry({"book": book}, timeout=5)
    arguments = '{"booking": {"when": "2024-05-06T07:08:09", "colour": "red", "seats": [3, 4]}, "count": 2}'
    assert await run(registry, "book", arguments) == ToolResult("call_1", "2024-05-06 red (3, 4) x2", False)
    # Strict still means strict: a string for the integer is refused.
    assert "count" in error_of(await run(registry, "book", arguments.replace('"count": 2', '"count": "2"')))


@pytest.mark.anyio
async def test_an_integer_past_64_bits_reaches_the_tool_with_every_digit() -> None:
    """orjson reads an integer past 64 bits as a float: `n: int` refused it ("exceeded maximum
    size"), and a `dict` or `Any` parameter got a rounded float instead of the number sent."""
    def factor(n: int, extra: dict[str, Any]) -> str:
        return f"{n} {extra['m']!r}"

    registry = ToolRegistry({"factor": factor}, timeout=5)
    big = "123456789012345678901234567890"
    result = await run(registry, "factor", f'{{"n": {big}, "extra": {{"m": {big}}}}}')
    assert result == ToolResult("call_1", f"{big} {big}", False)


@pytest.mark.anyio
async def test_an_integer_past_a_doubles_range_is_valid_json_and_keeps_every_digit() -> None:
    def digits(n: int) -> int:
        """Count the digits of an integer."""
        return len(str(abs(n)))

    registry = ToolRegistry({"digits": digits}, timeout=5)
    assert (await run(registry, "digits", '{"n": 1' + "0" * 400 + "}")).output == "401"
    for refused in ('{"n": 1e400}', '{"n": NaN}', '{"n": -Infinity}', '{"n": 1' + "0" * 400 + ",}"):
        assert "are not valid JSON" in error_of(await run(registry, "digits", refused)), refused


@pytest.mark.anyio
async def test_arguments_nested_deeper_than_pydantics_json_parser_goes_are_still_taken() -> None:
    """pydantic's JSON parser stops at 200 levels, orjson at 1024: what orjson reads is validated
    as objects then, as it was before the arguments were validated as JSON."""
    def store(data: Any) -> str:
        return "stored"

    deep = '{"data": ' + "[" * 300 + "]" * 300 + "}"
    assert (await run(ToolRegistry({"store": store}, timeout=5), "store", deep)).output == "stored"


@pytest.mark.anyio
async def test_a_sync_tool_raising_stop_iteration_fails_at_once_not_at_its_timeout() -> None:
    """`next(o for o in orders if ...)` with no match raises StopIteration. An asyncio Future
    refuses that exception (TypeError in the loop's callback), so the call waited out
    TOOL_TIMEOUT_SECONDS and the model was told the tool timed out."""
    def find_order(order_id: str) -> dict[str, str]:
        orders = [{"id": "ORD1"}]
        return next(order for order in orders if order["id"] == order_id)

    registry = ToolRegistry({"find_order": find_order}, timeout=3)
    start = time.monotonic()
    message = error_of(await run(registry, "find_order", '{"order_id": "ORD2"}'))
    assert time.monotonic() - start < 1
    assert "StopIteration" in message and "timed out" not in message
    assert not registry.thread_slots.borrowed_tokens


@pytest.mark.anyio
async def test_a_field_defaulting_to_none_also_takes_an_explicit_null() -> None:
    """The README: "A parameter defaulting to `None` also takes `null`". Written with a Field (to
    describe it), `limit: int = Field(None, ...)` showed the model `"default": null` and then
    refused the null it sent."""
    def search(query: str, limit: int = pydantic.Field(None, description="at most this many")) -> str:
        return f"{query} {limit}"

    registry = ToolRegistry({"search": search}, timeout=5)
    assert tool_schema(registry, "search")["parameters"]["properties"]["limit"]["description"] == "at most this many"
    assert (await run(registry, "search", '{"query": "q"}')).output == "q None"
    result = await run(registry, "search", '{"query": "q", "limit": null}')
    assert result == ToolResult("call_1", "q None", False)
    assert "limit" in error_of(await run(registry, "search", '{"query": "q", "limit": "many"}'))


@pytest.mark.anyio
async def test_arguments_wrong_everywhere_give_a_short_error_not_one_line_per_element() -> None:
    """A model that sends 100,000 strings for a list[int] made one mistake; listing each element
    made an 8 MB error result (16 times the arguments), sent back to the model in full and in the
    client's step event."""
    def total(values: list[int]) -> int:
        return sum(values)

    registry = ToolRegistry({"total": total}, timeout=5)
    message = error_of(await run(registry, "total", orjson.dumps({"values": ["x"] * 100_000}).decode()))
    assert len(message) < 2_000
    assert message.startswith("invalid arguments for tool 'total': values.0: Input should be a valid integer")
    assert message.endswith("and 99990 more")


def test_keyword_args_sections_describe_keyword_only_parameters() -> None:
    """Google style puts keyword-only parameters under "Keyword Args:" (or "Keyword Arguments:",
    "Other Parameters:"). That header was not known: it ran into the summary or into the previous
    parameter's description, and the parameters under it went undescribed."""
    def search(query: str, *, limit: int = 10) -> str:
        """Search the catalogue.

        Args:
            query: What to look for.

        Keyword Args:
            limit: How many results at most.
        """
        return query

    def lookup(query: str, *, limit: int = 10, exact: bool = False) -> str:
        """Look a word up.

        Keyword Arguments:
            limit: How many results at most.

        Other Parameters:
            exact: Only exact matches.
        """
        return query

    registry = ToolRegistry({"search": search, "lookup": lookup}, timeout=1)
    properties = tool_schema(registry, "search")["parameters"]["properties"]
    assert tool_schema(registry, "search")["description"] == "Search the catalogue."
    assert properties["query"]["description"] == "What to look for."
    assert properties["limit"]["description"] == "How many results at most."
    properties = tool_schema(registry, "lookup")["parameters"]["properties"]
    assert tool_schema(registry, "lookup")["description"] == "Look a word up."
    assert properties["limit"]["description"] == "How many results at most."
    assert properties["exact"]["description"] == "Only exact matches."


@pytest.mark.parametrize(
    ("a", "b", "op", "exact"),
    [(10, 23, "power", 10**23), (123456789, 987654321, "multiply", 121932631112635269),
     (9007199254740993, -2, "add", 9007199254740991)],
)
def test_the_calculator_never_shows_a_rounded_result_as_an_exact_integer(a: int, b: int, op: str, exact: int) -> None:
    """The calculator tells the model its result is exact. Past 2**53 a float is rounded, and
    its integer form looked exact while it was wrong (10**23 came out as
    100000000000000008388608): such a result stays a float, which says it is approximate."""
    result = calculator(a, b, op)  # type: ignore[arg-type]
    assert not (type(result) is int and result != exact)
    assert result == pytest.approx(exact)


@pytest.mark.anyio
async def test_a_field_alias_is_the_name_the_model_uses() -> None:
    """pydantic's `alias` names the argument: the model sees and sends that name, the function
    still gets its own parameter (it was ignored: the model was shown the parameter's name)."""
    def paged(
        from_: Annotated[int, pydantic.Field(alias="from", description="first item")],
        size: int = pydantic.Field(10, alias="pageSize"),
        order: Annotated[str, pydantic.Field(validation_alias="sort")] = "asc",
    ) -> str:
        """List items."""
        return f"{from_} {size} {order}"

    registry = ToolRegistry({"paged": paged}, timeout=5)
    parameters = registry.responses_tools[0]["parameters"]
    assert list(parameters["properties"]) == ["from", "pageSize", "sort"] and parameters["required"] == ["from"]
    assert registry.assistants_tools[0]["function"]["parameters"] == parameters
    result = await run(registry, "paged", '{"from": 3, "pageSize": 5, "sort": "desc"}')
    assert (result.is_error, result.output) == (False, "3 5 desc")
    assert "from" in error_of(await run(registry, "paged", '{"from_": 3}'))


def test_an_alias_the_model_could_not_be_given_is_refused_at_start_up() -> None:
    def choices(q: Annotated[str, pydantic.Field(validation_alias=pydantic.AliasChoices("q", "query"))]) -> str:
        """Search."""
        return q

    def clash(a: int, b: Annotated[int, pydantic.Field(alias="a")]) -> int:
        """Add."""
        return a + b

    with pytest.raises(ToolConfigError, match="'choices': parameter 'q': only a plain string alias"):
        ToolRegistry({"choices": choices}, timeout=5)
    with pytest.raises(ToolConfigError, match="'clash': two parameters take the argument 'a'"):
        ToolRegistry({"clash": clash}, timeout=5)
