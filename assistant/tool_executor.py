"""Expose plain Python functions to the model as tools.

The JSON schema the model sees is derived from each function's signature, type
hints and docstring, and the same pydantic model validates the arguments the
model sends back, so the two can never drift apart.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import enum
import functools
import importlib
import inspect
import json
import logging
import math
import re
import uuid
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Optional, get_origin

import anyio
import orjson
import pydantic
from pydantic.fields import FieldInfo

from .logs import redact, register_secrets

__all__ = [
    "ToolCall",
    "ToolConfigError",
    "ToolRegistry",
    "ToolResult",
    "error_output",
    "execute_tool",
    "load_tool_map",
]

logger = logging.getLogger("assistant.tools")

_DEFAULT_MODULE = "assistant.example_tools"
_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_SECTION_RE = re.compile(
    r"(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters|"
    r"Returns?|Yields?|Raises?|Warns|Examples?|Notes?|Attributes|References|See Also|Warnings?|Todo):"
)
# Google style (as Sphinx's napoleon reads it) puts keyword-only parameters under "Keyword Args:".
_PARAM_SECTIONS = {"Args", "Arguments", "Parameters", "Params", "Keyword Args", "Keyword Arguments", "Other Parameters"}
_PARAM_RE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
# Sync tool calls running at once, each in a thread of its own. A call past its timeout keeps its
# thread (and its place here) until the function returns: stuck calls cannot pile up threads.
MAX_TOOL_THREADS = 64
# OpenAI refuses any input string longer than this (400 string_above_max_length): a longer result
# could never reach the model, so the model is told instead.
MAX_OUTPUT_CHARS = 10_485_760
# OpenAI refuses a request with more tools than this (an assistant's hosted tools count too):
# every turn would fail (400 array_above_max_length), so start-up does instead.
MAX_TOOLS = 128
# ... and a function description longer than this (string_above_max_length, reported for the
# Chat Completions and Assistants shape): a longer docstring is cut, with a warning.
MAX_DESCRIPTION_CHARS = 1024
# Invalid arguments: the first problems are listed, then how many more there are.
MAX_LISTED_PROBLEMS = 10
# An error's message is cut after this many characters: an exception can quote its whole input
# (megabytes), which would go to the model, to every client and into the run's bounded log.
MAX_ERROR_CHARS = 4096


class ToolConfigError(ValueError):
    """TOOL_MAP is unusable; the message is shown to a human at start-up."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # raw JSON text the model produced


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_call_id: str
    output: str  # exactly what the model receives
    is_error: bool


@dataclass(frozen=True, slots=True)
class _Tool:
    func: Callable[..., Any]
    is_async: bool
    model: type[pydantic.BaseModel]
    params: tuple[tuple[str, str], ...]  # (model field name, parameter name)


class ToolRegistry:
    """Validated tools plus their schemas, built once at start-up."""

    def __init__(self, tool_map: Mapping[str, Callable[..., Any]], *, timeout: float) -> None:
        if not timeout > 0:
            raise ToolConfigError(f"tool timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout
        self.thread_slots = anyio.CapacityLimiter(MAX_TOOL_THREADS)
        self._tools: dict[str, _Tool] = {}
        self.responses_tools: list[dict[str, Any]] = []
        self.assistants_tools: list[dict[str, Any]] = []
        if len(tool_map) > MAX_TOOLS:
            raise ToolConfigError(
                f"TOOL_MAP has {len(tool_map)} tools; OpenAI takes at most {MAX_TOOLS} in a request"
            )
        for name, func in tool_map.items():
            tool, description, parameters = _build_tool(name, func)
            self._tools[name] = tool
            self.responses_tools.append(
                {
                    "type": "function",
                    "name": name,
                    "description": description,
                    "parameters": parameters,
                    "strict": False,
                }
            )
            self.assistants_tools.append(
                {
                    "type": "function",
                    "function": {"name": name, "description": description, "parameters": parameters},
                }
            )
        self.names: tuple[str, ...] = tuple(self._tools)


def load_tool_map(module_name: str | None) -> dict[str, Callable[..., Any]]:
    """Import ``module_name`` and return its ``TOOL_MAP`` (the example tools by default)."""
    module_name = module_name or _DEFAULT_MODULE
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a module that exits while importing, too
        raise ToolConfigError(
            f"cannot import tool module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        tool_map = module.TOOL_MAP
    except AttributeError:
        raise ToolConfigError(
            f"tool module {module_name!r} has no TOOL_MAP "
            "(expected a dict mapping tool names to functions)"
        ) from None
    if not isinstance(tool_map, dict):
        raise ToolConfigError(
            f"TOOL_MAP in tool module {module_name!r} must be a dict mapping tool names "
            f"to functions, got {type(tool_map).__name__}"
        )
    return dict(tool_map)


async def execute_tool(registry: ToolRegistry, call: ToolCall, *, correlation_id: str) -> ToolResult:
    """Run one tool call; every failure becomes an error result the model can read.

    Only a cancellation from outside (the run was stopped) propagates: whatever the tool raises,
    SystemExit and CancelledError included, or returns that cannot be sent, is the call's error.
    """
    extra = {"tool": call.name, "tool_call_id": call.call_id}
    try:
        return await _execute(registry, call, correlation_id, extra)
    except anyio.get_cancelled_exc_class():
        if cancelled_from_outside():
            raise
        logger.warning("tool %r raised CancelledError", call.name, extra=extra)
        return _error(call, correlation_id, "CancelledError")
    except BaseException as exc:
        logger.error("tool %r raised", call.name, exc_info=exc, extra=extra)
        return _error(call, correlation_id, _exception_text(exc))


async def _execute(registry: ToolRegistry, call: ToolCall, correlation_id: str, extra: dict[str, str]) -> ToolResult:
    tool = registry._tools.get(call.name)
    if tool is None:
        available = ", ".join(registry.names) or "none"
        return _error(call, correlation_id, f"unknown tool {call.name!r}; available tools: {available}")

    text = call.arguments.strip() or "{}"
    try:
        arguments = _load_json(text)
    except orjson.JSONDecodeError as exc:
        return _error(call, correlation_id, f"arguments for tool {call.name!r} are not valid JSON: {exc}")
    if not isinstance(arguments, dict):
        kind = _JSON_TYPES.get(type(arguments), "null")
        return _error(
            call, correlation_id, f"arguments for tool {call.name!r} must be a JSON object, got {kind}"
        )

    try:
        # Validated as the JSON it is, not as the Python objects orjson made of it: a strict model
        # or field takes a date as a string, an enum as its value, an array for a tuple, and an
        # integer past 64 bits (a float to orjson) keeps every digit.
        try:
            validated = tool.model.model_validate_json(text)
        except pydantic.ValidationError as exc:
            if not all(error["type"] == "json_invalid" for error in exc.errors()):
                raise
            # orjson took it, pydantic's parser did not: nested over its 200 levels. As objects, then.
            validated = tool.model.model_validate(arguments)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = "; ".join(_describe(error) for error in errors[:MAX_LISTED_PROBLEMS])
        if len(errors) > MAX_LISTED_PROBLEMS:  # one mistake repeated over a long list, most often
            problems += f"; and {len(errors) - MAX_LISTED_PROBLEMS} more"
        return _error(call, correlation_id, f"invalid arguments for tool {call.name!r}: {problems}")
    kwargs = {param: getattr(validated, field) for field, param in tool.params}

    start = time.perf_counter()
    # move_on_after rather than fail_after: a TimeoutError raised by the tool itself
    # (a socket timeout, say) must be reported as the tool's error, not ours.
    with anyio.move_on_after(registry.timeout) as scope:
        if tool.is_async:
            result = await tool.func(**kwargs)
        else:
            result = await _run_in_thread(functools.partial(tool.func, **kwargs), registry.thread_slots)
        if inspect.isawaitable(result):  # an async function behind a plain decorator
            result = await result
    if scope.cancelled_caught:
        logger.warning("tool %r timed out after %gs", call.name, registry.timeout, extra=extra)
        return _error(call, correlation_id, f"tool {call.name!r} timed out after {registry.timeout:g} s")

    logger.debug("tool %r finished in %.3fs", call.name, time.perf_counter() - start, extra=extra)
    output = _encode(result)
    if len(output) > MAX_OUTPUT_CHARS:
        return _error(call, correlation_id, f"tool {call.name!r} returned {len(output)} characters; "
                                            f"at most {MAX_OUTPUT_CHARS} can be sent to the model")
    return ToolResult(tool_call_id=call.call_id, output=output, is_error=False)


def _load_json(text: str) -> Any:
    """The arguments' JSON. orjson reads an integer past a double's range as infinity and refuses
    it; the standard library keeps every digit (and still refuses NaN, Infinity and an
    infinite float, as orjson does)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise exc from None


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _refuse_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


async def _run_in_thread(func: Callable[[], Any], slots: anyio.CapacityLimiter) -> Any:
    """Run a sync tool in a daemon thread of its own, not in anyio's shared worker pool: a call
    still running past its timeout (stuck in I/O, say) then cannot keep the process from
    exiting, nor take the threads Starlette serves files with. `slots` bounds how many run at
    once; a waiting call's wait counts toward its timeout."""
    token = object()
    await slots.acquire_on_behalf_of(token)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()  # the run's correlation ID, for the tool's own logging

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (context.run(func), None)
        except StopIteration as exc:  # `next()` on an empty iterator: a Future refuses it (TypeError),
            error = RuntimeError("tool raised StopIteration")  # so say it as a coroutine would
            error.__cause__ = exc
            outcome = (None, error)
        except BaseException as exc:  # handed to the caller, as if raised there
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(_settle, done, outcome, slots, token)
        except RuntimeError:
            pass  # the event loop is closed: the service stopped meanwhile

    try:
        threading.Thread(target=run, name="tool", daemon=True).start()
    except BaseException:
        slots.release_on_behalf_of(token)
        raise
    return await done


def _settle(
    done: asyncio.Future[Any], outcome: tuple[Any, BaseException | None], slots: anyio.CapacityLimiter, token: object
) -> None:
    slots.release_on_behalf_of(token)
    if done.cancelled():  # timed out or stopped: nobody waits for the result
        return
    result, error = outcome
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


def cancelled_from_outside() -> bool:
    """Whether a CancelledError is a real cancellation (the task was asked to stop), not one a
    tool raised by itself."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _exception_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception whose own __str__ fails
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_output(message: str, correlation_id: str) -> str:
    """What a call that failed (or never finished) gives the model and the client: why, with
    keys masked (before the cut: a key cut in two would escape the mask), and the request's
    correlation ID."""
    message = redact(_clean(message))
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS} more characters)"
    return orjson.dumps({"error": message, "correlation_id": correlation_id}).decode()


def _error(call: ToolCall, correlation_id: str, message: str) -> ToolResult:
    return ToolResult(tool_call_id=call.call_id, output=error_output(message, correlation_id), is_error=True)


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    return f"{location}: {error['msg']}" if location else error["msg"]


def _clean(text: str) -> str:
    """Text that is valid UTF-8: a lone surrogate (say, a file name decoded with
    surrogateescape) would make every JSON encoder downstream refuse the whole event."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _encode(result: Any) -> str:
    """A string as it is, anything else as JSON; a result that cannot be raises ValueError."""
    if isinstance(result, str):
        return _clean(result)
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise ValueError("the tool returned a generator: return a value (a list, say)")
    try:
        return orjson.dumps(result, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:  # integers beyond 64 bits, surrogates, nesting over 254 deep, tuple keys
        pass
    try:
        return _clean(json.dumps(_plain(result), ensure_ascii=False))
    except (ValueError, TypeError, RecursionError) as exc:  # circular, or too deep even for Python
        raise ValueError(f"the tool's result cannot be sent as JSON: {_exception_text(exc)}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    return str(obj)


def _plain(value: Any) -> Any:
    """`value` as plain data, made as orjson makes it, for the `json` fallback: the same result
    reads the same whether or not something elsewhere in it (a big integer) needed the fallback."""
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_plain_key(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if not f.name.startswith("_")}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return _json_default(value)


def _plain_key(key: Any) -> Any:
    """A key `json` writes as orjson does (a number, true, null), else its text: a tuple, say, as its `str()`."""
    if isinstance(key, (enum.Enum, datetime.date, datetime.time, uuid.UUID)):
        plain = _plain(key)
        if plain is None or isinstance(plain, (str, int, float, bool)):
            return plain
    elif key is None or isinstance(key, (str, int, float, bool)):
        return key
    return str(key)


def _build_tool(name: object, func: object) -> tuple[_Tool, str, dict[str, Any]]:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ToolConfigError(
            f"invalid tool name {name!r}: use 1-64 letters, digits, underscores or hyphens"
        )
    if not callable(func):
        raise ToolConfigError(f"tool {name!r} is not callable: {func!r}")
    try:
        signature = inspect.signature(func, eval_str=True)
    except Exception as exc:
        raise ToolConfigError(
            f"tool {name!r}: cannot read its signature: {type(exc).__name__}: {exc}"
        ) from exc

    documented = func
    while isinstance(documented, functools.partial):  # partial's own docstring says nothing
        documented = documented.func
    summary, param_docs = _parse_docstring(inspect.getdoc(documented) or "")
    if len(summary) > MAX_DESCRIPTION_CHARS:
        logger.warning("tool %r: its description (the docstring before Args:) has %d characters; "
                       "the model gets the first %d", name, len(summary), MAX_DESCRIPTION_CHARS)
        summary = summary[:MAX_DESCRIPTION_CHARS]
    # A functools.partial's keyword arguments are its own (an API key, say): not the model's to
    # see or to set, and masked where an error or a log line would show them (an HTTP library's
    # error quotes the URL, key and all).
    bound = set(func.keywords) if isinstance(func, functools.partial) else set()
    if isinstance(func, functools.partial):
        register_secrets(*(value for value in (*func.args, *func.keywords.values()) if isinstance(value, str)))
    fields: dict[str, Any] = {}
    params: list[tuple[str, str]] = []
    arguments: set[str] = set()  # the names the model uses
    for index, param in enumerate(signature.parameters.values()):
        if param.name in bound:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolConfigError(
                f"tool {name!r}: *args/**kwargs parameter {param.name!r} is not supported; "
                "list every argument explicitly"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolConfigError(
                f"tool {name!r}: positional-only parameter {param.name!r} is not supported; "
                "tools are called with keyword arguments"
            )
        if param.annotation is param.empty:
            raise ToolConfigError(
                f"tool {name!r}: parameter {param.name!r} needs a type hint "
                "(it defines the JSON schema the model sees)"
            )
        infos = _field_infos(param)
        argument = _argument_name(name, param, infos)
        if argument in arguments:
            raise ToolConfigError(f"tool {name!r}: two parameters take the argument {argument!r}")
        arguments.add(argument)
        options: dict[str, Any] = {"alias": argument}
        doc = param_docs.get(param.name)
        if doc and not any(info.description for info in infos):  # the Field's own description wins
            options["description"] = doc
        # Model fields get neutral names, the parameter name is the alias: parameters
        # called `json`, `schema` or `_private` would otherwise clash with BaseModel.
        field = f"arg_{index}"
        if isinstance(param.default, FieldInfo):  # `x: int = Field(3, description=...)`
            annotation = param.annotation
            if param.default.default is None and not _accepts_none(annotation):
                annotation = Optional[annotation]  # as below
            fields[field] = (Annotated[annotation, param.default], pydantic.Field(**options))
        else:
            default = ... if param.default is param.empty else param.default
            annotation = param.annotation
            if default is None and not _accepts_none(annotation):
                # `limit: int = None`: the function takes None, so the model may send null.
                annotation = Optional[annotation]
            fields[field] = (annotation, pydantic.Field(default, **options))
        params.append((field, param.name))

    try:
        model = pydantic.create_model(
            f"{name}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid"),
            **fields,
        )
        schema = model.model_json_schema()
    except Exception as exc:
        raise ToolConfigError(
            f"tool {name!r}: cannot build an argument schema from its type hints: {exc}"
        ) from exc
    try:
        orjson.dumps(schema)  # sent with every turn: fail at start-up, not on each request
    except TypeError as exc:
        raise ToolConfigError(f"tool {name!r}: its argument schema cannot be sent as JSON: {exc}") from exc

    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)
    )
    return _Tool(func, is_async, model, tuple(params)), summary, _parameters_schema(schema)


def _field_infos(param: inspect.Parameter) -> list[FieldInfo]:
    """The parameter's pydantic `Field`s: in `Annotated[T, Field(...)]`, then its default's."""
    annotated = get_origin(param.annotation) is Annotated
    infos = [meta for meta in param.annotation.__metadata__ if isinstance(meta, FieldInfo)] if annotated else []
    return infos + ([param.default] if isinstance(param.default, FieldInfo) else [])


def _argument_name(tool: object, param: inspect.Parameter, infos: list[FieldInfo]) -> str:
    """The name the model gives the argument: the parameter's, or its `Field(alias=...)`."""
    for info in reversed(infos):  # the default's Field last, as pydantic merges them
        alias = info.validation_alias if info.validation_alias is not None else info.alias
        if isinstance(alias, str):
            return alias
        if alias is not None:
            raise ToolConfigError(f"tool {tool!r}: parameter {param.name!r}: only a plain string alias is "
                                  "supported (the model is given one name per argument)")
    return param.name


def _accepts_none(annotation: Any) -> bool:
    try:
        pydantic.TypeAdapter(annotation).validate_python(None)
    except Exception:  # a ValidationError, or a type pydantic cannot build (reported later)
        return False
    return True


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and ``Args:`` descriptions."""
    summary: list[str] = []
    params: dict[str, list[str]] = {}
    section: str | None = None
    item_indent: int | None = None
    current: list[str] | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = _SECTION_RE.fullmatch(stripped)
        if header and indent == 0:
            section, item_indent, current = header.group(1), None, None
        elif section is None:
            summary.append(stripped)
        elif section in _PARAM_SECTIONS and stripped:
            if item_indent is None:
                item_indent = indent
            match = _PARAM_RE.fullmatch(stripped) if indent <= item_indent else None
            if match:
                current = params.setdefault(match.group(1), [])
                current.append(match.group(2))
            elif current is not None:
                current.append(stripped)
    descriptions = {name: " ".join(" ".join(parts).split()) for name, parts in params.items()}
    return " ".join(" ".join(summary).split()), descriptions


def _parameters_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Reshape pydantic's schema into the canonical object schema the model expects."""
    schema = _strip_titles(schema)
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": schema.get("properties", {}),
        "required": schema.get("required", []),
        "additionalProperties": False,
    }
    if "$defs" in schema:
        parameters["$defs"] = schema["$defs"]
    return parameters


_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's ``title`` keywords; titles are noise to the model.

    Walks only schema positions, so a property *named* ``title`` and data such as
    ``default`` or ``enum`` values are left alone.
    """
    if not isinstance(schema, dict):
        return schema
    cleaned = {key: value for key, value in schema.items() if not (key == "title" and isinstance(value, str))}
    for key in _SCHEMA_MAPS:
        if isinstance(cleaned.get(key), dict):
            cleaned[key] = {name: _strip_titles(sub) for name, sub in cleaned[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(cleaned.get(key), list):
            cleaned[key] = [_strip_titles(sub) for sub in cleaned[key]]
    for key in _SCHEMA_VALUES:
        if key in cleaned:
            cleaned[key] = _strip_titles(cleaned[key])
    kind = cleaned.get("type")
    if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and "items" not in cleaned:
        # OpenAI refuses an array schema without `items`, strict or not ("array schema missing
        # items"), and ignores `prefixItems`, which pydantic gives a fixed-length tuple instead.
        # minItems/maxItems still fix the length; items says what the elements may be.
        elements: list[Any] = []
        for element in cleaned.get("prefixItems") or []:
            if element not in elements:
                elements.append(element)
        cleaned["items"] = elements[0] if len(elements) == 1 else {"anyOf": elements} if elements else {}
    return cleaned
