"""Smoke test of the benchmark (bench/run.py): its quick run goes through every scenario.

`--quick` starts the fast fake upstream and the service as the Procfile does, and drives each
scenario (full rate, concurrent streams, sustained, idle streams, connection churn, streams
that end and begin) over SSE and WebSocket at a tiny
size, then the floors (bench/floor.py's relays in the service's place) over SSE. This test checks that the benchmark still works end to end and that no stream failed. It
never asserts on a timing, CPU or memory figure: CI machines are too noisy, and that is what the
full run (`python bench/run.py --pin`) is for.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("A full rate", "B ", "C ", "D idle", "E churn", "G ")
FLOORS = ("F floor: raw asyncio relay", "F floor: bare ASGI relay, hypercorn")  # SSE only


@pytest.mark.timeout(180)  # above the subprocess's own limit, so a hang reports its output
def test_quick_benchmark_runs_every_scenario_without_errors() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output

    rows = [[cell.strip() for cell in line.split("|")] for line in proc.stdout.splitlines() if line.count("|") >= 5]
    rows = [r for r in rows if r[0] != "scenario"]
    for scenario in SCENARIOS:
        for transport in ("sse", "ws"):
            assert any(r[0].startswith(scenario) and r[1] == transport for r in rows), (
                f"no {scenario.strip()!r} rows for {transport}\n{output}")

    for floor in FLOORS:
        assert any(r[0] == floor and r[1] == "sse" and r[2] == "errors" and r[3] == "0" for r in rows), (
            f"no clean {floor!r} run\n{output}")

    error_rows = [r for r in rows if r[2].startswith("errors")]
    # every scenario reports its errors, per transport (B twice: its 1-delta turns too)
    for scenario in SCENARIOS:
        assert sum(r[0].startswith(scenario) for r in error_rows) >= 2, output
    assert all(r[3] == "0" for r in error_rows), output
    assert "errors counted: 0" in proc.stdout, output


@pytest.mark.timeout(120)
def test_the_call_counter_counts_the_services_calls_per_delta_and_per_turn() -> None:
    """bench/count_calls.py --quick: the counter loads in the server, counts, and attributes the
    calls to packages (the service's own among them). It asserts no count: only that there are some."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "count_calls.py"), "--quick", "--top", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output
    rows = {cells[0]: [float(c) for c in cells[1:]]
            for cells in ([c.strip() for c in line.split("|")] for line in proc.stdout.splitlines())
            if len(cells) == 5 and cells[0] not in ("package", "") and not cells[0].startswith("-")}
    for package in ("assistant", "asyncio", "h11", "hypercorn", "starlette", "total"):
        assert package in rows, output
    python_per_delta, c_per_delta, python_per_turn, c_per_turn = rows["assistant"]
    assert python_per_delta > 0 and c_per_delta > 0 and python_per_turn > python_per_delta, output
    assert "per delta, the functions called most:" in proc.stdout, output
