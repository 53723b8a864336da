"""Counts the calls of one process, for bench/count_calls.py: Python imports this file at start-up
from any directory on PYTHONPATH, and bench/count_calls.py puts this one there for the process it
counts.

It does nothing unless BENCH_CALL_COUNTS names a file. Then SIGUSR1 starts counting the main
thread's calls (`sys.setprofile`), and SIGUSR2 stops and writes them to that file, one
tab-separated line per function: count, "py" (with the function's file) or "c" (with its
caller's file), the function's name.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from types import FrameType
from typing import Any


def _install(path: str) -> None:
    counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        # `call`: a Python function entered, or a coroutine or generator resumed. `c_call`: a C
        # function called from Python, counted with the file that called it.
        if frame.f_code.co_filename == __file__:  # the signal handler stopping the count
            return
        if event == "call":
            counts["py", frame.f_code.co_filename, frame.f_code.co_name] += 1
        elif event == "c_call":
            counts["c", frame.f_code.co_filename, getattr(arg, "__qualname__", repr(arg))] += 1

    def start(signum: int, frame: FrameType | None) -> None:
        counts.clear()
        sys.setprofile(profile)

    def stop(signum: int, frame: FrameType | None) -> None:
        sys.setprofile(None)
        with open(path + ".part", "w") as out:
            for (kind, filename, name), count in counts.most_common():
                out.write(f"{count}\t{kind}\t{filename}\t{name}\n")
        os.replace(path + ".part", path)  # the reader sees the whole file or none

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if os.environ.get("BENCH_CALL_COUNTS"):
    _install(os.environ["BENCH_CALL_COUNTS"])
