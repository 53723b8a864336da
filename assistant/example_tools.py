"""Example tools, used when no tool module is configured.

Each tool's docstring and type hints are what the model sees, so they are
written for the model: say what the tool is for and what each argument means.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

__all__ = ["TOOL_MAP", "calculator", "get_current_time", "roll_dice"]


def calculator(
    a: float, b: float, op: Literal["add", "subtract", "multiply", "divide", "power"]
) -> float:
    """Calculate an exact result of an arithmetic operation on two numbers.

    Use this instead of doing arithmetic in your head.

    Args:
        a: The first operand.
        b: The second operand.
        op: The operation to apply: a + b, a - b, a * b, a / b or a raised to
            the power b.
    """
    a, b = float(a), float(b)  # int ** int could grow without bound
    try:
        if op == "add":
            result = a + b
        elif op == "subtract":
            result = a - b
        elif op == "multiply":
            result = a * b
        elif op == "divide":
            result = a / b
        else:
            result = a**b
    except ZeroDivisionError:
        if op == "divide":
            raise ValueError(f"cannot divide {a:g} by zero") from None
        raise ValueError("cannot raise zero to a negative power") from None
    except OverflowError:
        raise ValueError("the result is too large to represent") from None
    if isinstance(result, complex):
        raise ValueError("the result is not a real number")
    if not math.isfinite(result):
        raise ValueError("the result is too large to represent")
    # 19 * 3 reads better as 57 than 57.0. From 2**53 on a float is rounded (an operand, or the
    # result), and an integer would look exact (10**23 as 100000000000000008388608): a float says
    # it is not.
    exact = max(abs(a), abs(b), abs(result)) < 2**53
    return int(result) if exact and float(result).is_integer() else result


def get_current_time(timezone: str = "UTC") -> str:
    """Get the current date and time in a time zone, as ISO 8601 with UTC offset.

    Args:
        timezone: An IANA time zone name, such as "Europe/Paris" or
            "America/New_York".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    return datetime.now(zone).isoformat(timespec="seconds")


def roll_dice(
    sides: Annotated[int, Field(ge=2, le=1000)] = 6,
    count: Annotated[int, Field(ge=1, le=100)] = 1,
) -> dict[str, Any]:
    """Roll one or more fair dice and report each roll and their total.

    Args:
        sides: Number of faces on each die.
        count: How many dice to roll.
    """
    rolls = [random.randint(1, sides) for _ in range(count)]
    return {"rolls": rolls, "total": sum(rolls)}


TOOL_MAP: dict[str, Callable[..., Any]] = {
    "calculator": calculator,
    "get_current_time": get_current_time,
    "roll_dice": roll_dice,
}
