"""scripts/fault_suite.py as its users run it: a subprocess, one try per fault, every fault at 100%."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest

from tests.e2e import REPO, clean_environment

SCRIPT = REPO / "scripts" / "fault_suite.py"


def load_script() -> ModuleType:
    """The script as a module (importing it starts nothing: its work is under __main__)."""
    if "fault_suite" in sys.modules:
        return sys.modules["fault_suite"]
    spec = importlib.util.spec_from_file_location("fault_suite", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fault_names() -> list[str]:
    return [name for name, _ in load_script().FAULTS]


def table_rows(output: str) -> dict[str, list[str]]:
    """The table's rows by fault: `| fault | tries | turns ended cleanly | threads usable afterwards |`."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "fault":
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.timeout(150)
def test_every_fault_ends_cleanly_and_leaves_the_thread_usable() -> None:
    names = fault_names()
    assert len(names) >= 14 and len(set(names)) == len(names)
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), "--runs", "1"], cwd=REPO, env=clean_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=130)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the script stops its servers on the way out
            stdout, stderr = proc.communicate(timeout=15)
            pytest.fail(f"the suite took over 130 s:\n{stdout}{stderr}")
    output = stdout + stderr
    assert proc.returncode == 0, output
    rows = table_rows(stdout)
    assert list(rows) == names, output
    for name, (tries, clean, usable) in rows.items():
        assert (tries, clean, usable) == ("1", "1/1 (100%)", "1/1 (100%)"), f"{name}: {output}"


def test_a_row_below_100_percent_fails_the_run() -> None:
    """The exit status is what CI sees: any imperfect row makes it 1."""
    module = load_script()
    assert module.Row("x", tries=5, clean=5, usable=5).perfect
    assert not module.Row("x", tries=5, clean=4, usable=5).perfect
    assert not module.Row("x", tries=5, clean=5, usable=4).perfect
    assert not module.Row("x").perfect
