"""Counts the function calls the service makes per delta and per turn, by package: figures that,
unlike CPU time, do not drift with the machine, so a change of a few percent shows.

    python bench/count_calls.py [--transport sse|ws] [--floor] [--top N] [--quick]

It starts bench/fast_upstream.py and the service as bench/run.py does (the Procfile's command;
with --floor, bench/floor.py's bare ASGI relay under hypercorn instead), with bench/call_counter/
on the server's PYTHONPATH: its sitecustomize.py turns `sys.setprofile` on and off in the
serving process on a signal. Two loads from bench/load.py, each counted over a window in its
middle, where nothing starts or ends but what is measured:

  per delta  20 streams x 300 deltas at 20/s: one delta per wake-up, as in bench/run.py's B
  per turn   10 clients running 1-delta turns back to back, a new connection each: a whole
             turn (its one delta included)

A call is a Python function entered or a coroutine or generator resumed (a task that wakes up
re-enters every frame of its await chain), counted in the package of that function, or a C
function called from Python, counted in the package of its caller. The deltas and turns counted
are those the load received in the window. The profiler slows the server several times over,
hence the light loads. The counts depend on the load, not on the machine's speed: how many
events one read or one loop iteration carries changes asyncio's share, so compare counts of
the same load only (not --quick's, which are rough). --quick: a tiny run, in seconds (CI's
smoke test).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from run import BENCH, REPO, Service, Upstream, raise_fd_limit

COUNTER_DIR = BENCH / "call_counter"
_STDLIB = Path(os.__file__).resolve().parent


def package_of(filename: str) -> str:
    """The package a code file belongs to: `assistant`, `bench`, a site-package's top directory,
    `asyncio`, or `stdlib` for the rest of the standard library."""
    path = Path(filename)
    if not path.is_absolute():  # <frozen ...>, <string> (dataclasses' and namedtuples' generated code)
        return "stdlib"
    parts = path.resolve().parts
    for packages in ("site-packages", "dist-packages"):
        if packages in parts:
            return parts[parts.index(packages) + 1].removesuffix(".py")
    try:
        relative = path.resolve().relative_to(REPO)
    except ValueError:
        return "asyncio" if path.resolve().is_relative_to(_STDLIB / "asyncio") else "stdlib"
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 else "app"


class CountedServer:
    """The server with the call counter loaded; `start()` and `stop()` bracket a window of its life."""

    def __init__(self, upstream: Upstream, floor: bool) -> None:
        self.out = Path(tempfile.gettempdir()) / f"bench-calls-{os.getpid()}.tsv"  # the server writes it
        saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "BENCH_CALL_COUNTS")}
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COUNTER_DIR), saved["PYTHONPATH"]]))
        os.environ["BENCH_CALL_COUNTS"] = str(self.out)
        try:
            self.service = Service(upstream, None, floor="hypercorn" if floor else None)
        finally:  # the load and anything started later go uncounted
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def start(self) -> float:
        os.kill(self.service.worker, signal.SIGUSR1)
        return time.time()

    def stop(self) -> tuple[float, list[tuple[int, str, str, str]]]:
        self.out.unlink(missing_ok=True)
        os.kill(self.service.worker, signal.SIGUSR2)
        t1 = time.time()
        deadline = time.monotonic() + 30
        while not self.out.exists():  # the counter writes another file, then renames it to this one
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not write its call counts (its log: {self.service.log_path})")
            time.sleep(0.05)
        rows = []
        for line in self.out.read_text().splitlines():
            count, kind, filename, name = line.split("\t")
            rows.append((int(count), kind, filename, name))
        return t1, rows

    def close(self, keep_log: bool) -> None:
        self.service.stop()
        self.out.unlink(missing_ok=True)
        if keep_log:
            print(f"server log: {self.service.log_path}", file=sys.stderr)
        else:
            self.service.log_path.unlink(missing_ok=True)


def run_load(server: CountedServer, transport: str, streams: int, deltas: int, rate: float,
             duration: float, window: tuple[float, float]) -> tuple[list[tuple[int, str, str, str]], int, int]:
    """One load; the counts over `window` (seconds after GO: from, to) and the deltas and turns
    the load received in it."""
    command = [sys.executable, str(BENCH / "load.py"), "--url", f"http://127.0.0.1:{server.service.port}",
               "--transport", transport, "--streams", str(streams), "--deltas", str(deltas), "--rate", str(rate),
               "--ramp", "0.5", "--turn-timeout", "120", "--duration", str(duration)]
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("bench/load.py did not start")
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        go = time.time()
        time.sleep(window[0])
        t0 = server.start()
        time.sleep(max(0.0, go + window[1] - time.time()))
        t1, rows = server.stop()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    result: dict[str, Any] = orjson.loads(output.strip().splitlines()[-1])
    if result["error_count"]:
        raise RuntimeError(f"the load counted errors: {result['errors']}")
    deltas_in = sum(1 for sent, latency in result["samples"] if t0 <= sent + latency <= t1)
    turns_in = sum(1 for turn in result["turns"] if turn[2] is not None and t0 <= turn[2] <= t1)
    return rows, deltas_in, turns_in


def by_package(rows: list[tuple[int, str, str, str]], per: int) -> dict[str, tuple[float, float]]:
    """Python calls per unit by the package of the function called, C calls by their caller's."""
    python: collections.Counter[str] = collections.Counter()
    c: collections.Counter[str] = collections.Counter()
    for count, kind, filename, _ in rows:
        (python if kind == "py" else c)[package_of(filename)] += count
    return {name: (python[name] / per, c[name] / per) for name in python | c}


def print_table(title: str, per_delta: dict[str, tuple[float, float]], per_turn: dict[str, tuple[float, float]]) -> None:
    print(title)
    print(f"{'package':<14} | {'per delta: Python':>17} | {'C':>6} | {'per turn: Python':>16} | {'C':>6}")
    print(f"{'-' * 14}-+-{'-' * 17}-+-{'-' * 6}-+-{'-' * 16}-+-{'-' * 6}")
    names = sorted(per_delta.keys() | per_turn.keys(), key=lambda n: -sum(per_turn.get(n, (0, 0))))
    for name in [*names, "total"]:
        if name == "total":
            d = tuple(sum(v[i] for v in per_delta.values()) for i in (0, 1))
            t = tuple(sum(v[i] for v in per_turn.values()) for i in (0, 1))
        else:
            d, t = per_delta.get(name, (0.0, 0.0)), per_turn.get(name, (0.0, 0.0))
        print(f"{name:<14} | {d[0]:17.1f} | {d[1]:6.1f} | {t[0]:16.1f} | {t[1]:6.1f}")


def print_top(title: str, rows: list[tuple[int, str, str, str]], per: int, top: int) -> None:
    print(f"\n{title}")
    for count, kind, filename, name in rows[:top]:
        print(f"{count / per:8.2f}  {'C ' if kind == 'c' else ''}{name}  ({package_of(filename)}: {Path(filename).name})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["sse", "ws"], default="sse")
    parser.add_argument("--floor", action="store_true", help="count bench/floor.py's bare hypercorn relay instead")
    parser.add_argument("--top", type=int, default=0, help="also list the N functions called most, per delta and per turn")
    parser.add_argument("--quick", action="store_true", help="a tiny run, in seconds (CI's smoke test)")
    args = parser.parse_args()
    if args.floor and args.transport != "sse":
        parser.error("the floor relays SSE only")
    raise_fd_limit()
    if args.quick:
        delta_load, delta_window = (4, 40, 20.0, 0.0), (0.8, 1.6)
        turn_load, turn_window = (2, 1, 0.0, 2.0), (0.8, 1.6)
    else:
        delta_load, delta_window = (20, 300, 20.0, 0.0), (4.0, 9.0)
        turn_load, turn_window = (10, 1, 0.0, 10.0), (3.0, 7.0)

    upstream = Upstream(None)
    try:
        server = CountedServer(upstream, args.floor)
        failed = True
        try:
            run_load(server, args.transport, 5, 5, 0.0, 0.0, (0.0, 0.3))  # warm-up: imports, pools
            delta_rows, deltas, _ = run_load(server, args.transport, *delta_load, delta_window)
            turn_rows, _, turns = run_load(server, args.transport, *turn_load, turn_window)
            failed = False
        finally:
            server.close(keep_log=failed)
    finally:
        upstream.stop()
    if not deltas or not turns:
        print(f"nothing counted: {deltas} deltas, {turns} turns in the windows", file=sys.stderr)
        return 1
    what = "bench/floor.py's bare hypercorn relay" if args.floor else "the service"
    print_table(f"calls in {what}, {args.transport}: per delta ({deltas} deltas counted) and per turn "
                f"with one delta ({turns} turns counted){'; quick: rough' if args.quick else ''}",
                by_package(delta_rows, deltas), by_package(turn_rows, turns))
    if args.top:
        print_top("per delta, the functions called most:", delta_rows, deltas, args.top)
        print_top("per turn, the functions called most:", turn_rows, turns, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
