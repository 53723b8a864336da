"""The tools the service runs in the end-to-end tests (ASSISTANT_TOOLS=tests.e2e_tools).

Each one is deterministic, so a test can tell from a step's output exactly what happened:
a result, an exception the tool raised, or a timeout the service imposed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

from assistant.example_tools import calculator


def get_weather(city: str) -> dict[str, Any]:
    """Get the current weather in a city (a fake: the same city always gets the same weather).

    Args:
        city: The city's name, such as "Paris" or "Beijing".
    """
    return {"city": city, "temperature_c": 10 + len(city) % 20, "conditions": "sunny"}


async def slow_tool(seconds: float) -> str:
    """Wait without blocking the service, then answer "slept".

    Args:
        seconds: How long to wait.
    """
    await anyio.sleep(seconds)
    return "slept"


def failing_tool() -> str:
    """Always fail with ValueError("boom")."""
    raise ValueError("boom")


def sync_sleep(seconds: float) -> str:
    """Block a worker thread for a while (a synchronous tool), then answer "slept".

    Args:
        seconds: How long to block.
    """
    time.sleep(seconds)
    return "slept"


TOOL_MAP: dict[str, Callable[..., Any]] = {
    "calculator": calculator,
    "get_weather": get_weather,
    "slow_tool": slow_tool,
    "failing_tool": failing_tool,
    "sync_sleep": sync_sleep,
}
