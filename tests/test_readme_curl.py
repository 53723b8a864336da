"""The curl commands of README.md's "## API" section, run as written against the real service.

They are taken from the code block after the endpoint table and run with `bash -c`; the only
changes are the address (127.0.0.1:8000 -> the test service) and the `conv_...` placeholder (->
the thread id the README's own `POST /threads` command printed). Without curl the tests skip,
unless the environment variable CI is set: then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import REPO, ServerProcess, clean_environment
from tests.e2e import dump_server_logs_on_failure, fake_upstream, service  # noqa: F401

pytestmark = pytest.mark.timeout(60)

README = REPO / "README.md"
README_ADDRESS = "127.0.0.1:8000"
THREAD_PLACEHOLDER = "conv_..."
README_MESSAGE = "What is 19 times 3?"
SLOW_MESSAGE = "fault:slow 0.2 10"  # the fake sends ten text deltas, 0.2 s apart
SLOW_REPLY = " ".join(f"word{n}" for n in range(10))
DELTA_LINE = "event: thread.message.delta"
COMMAND_TIMEOUT_SECONDS = 20


# ---------------------------------------------------------------------------------------------
# The README's commands


def api_code_block(readme: str) -> str:
    """The first code block after the endpoint table of the "## API" section."""
    section = re.search(r"^## API\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, 'README.md has no "## API" section'
    table = re.search(r"^\|.*/chat.*\|$(?:\n^\|.*\|$)*", section[1], re.M)
    assert table, 'the "## API" section has no endpoint table'
    block = re.search(r"^```\w*\n(.*?)^```", section[1][table.end() :], re.M | re.S)
    assert block, 'no code block after the "## API" endpoint table'
    return block[1]


def shell_commands(block: str) -> list[str]:
    """The block's commands as written (continuation lines kept), without comment lines."""
    commands: list[str] = []
    current: list[str] = []
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        if not line.endswith("\\"):
            commands.append("\n".join(current))
            current = []
    assert not current, f"a command ends with a continuation: {current}"
    return commands


def readme_commands() -> dict[str, str]:
    """{"threads", "json_chat", "sse_chat"}: the three curl commands, as README.md has them."""
    commands = shell_commands(api_code_block(README.read_text()))
    found: dict[str, str] = {}
    for command in commands:
        assert command.startswith("curl "), command
        if "/threads" in command:
            kind = "threads"
        elif "/chat" in command and "text/event-stream" in command:
            kind = "sse_chat"
        elif "/chat" in command:
            kind = "json_chat"
        else:
            raise AssertionError(f"unexpected command in the README's API block: {command}")
        assert kind not in found, f"two {kind} commands: {found[kind]!r}, {command!r}"
        found[kind] = command
    assert set(found) == {"threads", "json_chat", "sse_chat"}, commands
    return found


def substitute(command: str, service: ServerProcess, thread_id: str | None = None) -> str:
    assert README_ADDRESS in command, command
    command = command.replace(README_ADDRESS, service.url.removeprefix("http://"))
    if thread_id is not None:
        assert command.count(THREAD_PLACEHOLDER) == 1, command
        command = command.replace(THREAD_PLACEHOLDER, thread_id)
    return command


# ---------------------------------------------------------------------------------------------
# Running them


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        reason = "curl is not installed: the README's curl commands cannot be checked"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set, so this may not be skipped", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def shell_env() -> Iterator[dict[str, str]]:
    """No proxies, and no ~/.curlrc of the developer's: an empty home for curl."""
    with tempfile.TemporaryDirectory(prefix="readme-curl-") as home:
        yield clean_environment(HOME=home, CURL_HOME=home, XDG_CONFIG_HOME=home)


def run(command: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
    )
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr}"
    return done.stdout


def run_timed_lines(command: str, env: dict[str, str]) -> list[tuple[float, str]]:
    """Run it, reading its stdout line by line while it runs: (time.monotonic() of arrival, line)."""
    lines: list[tuple[float, str]] = []
    with tempfile.TemporaryFile() as stderr, subprocess.Popen(
        ["bash", "-c", command], env=env, stdout=subprocess.PIPE, stderr=stderr, bufsize=0
    ) as proc:
        watchdog = threading.Timer(COMMAND_TIMEOUT_SECONDS, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                lines.append((time.monotonic(), raw.decode().rstrip("\r\n")))
            proc.wait()
        finally:
            watchdog.cancel()
        stderr.seek(0)
        assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{stderr.read().decode(errors='replace')}"
    return lines


def sse_events(lines: list[str]) -> list[tuple[str, Any]]:
    """(event name, JSON data) of each event in SSE lines (the service sends one data line each)."""
    events, name = [], "message"
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
            name = "message"
    return events


def new_thread(commands: dict[str, str], service: ServerProcess, env: dict[str, str]) -> str:
    """The README's `POST /threads` command; its JSON output's thread_id."""
    body = json.loads(run(substitute(commands["threads"], service), env))
    thread_id = body["thread_id"]
    assert thread_id.startswith("conv_"), body  # what the README's placeholder stands for
    assert body["initial_message"] == "Hello! Ask me anything."
    return thread_id


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_api_section_has_the_three_curl_commands() -> None:
    commands = readme_commands()
    assert commands["threads"] == f"curl -s -X POST http://{README_ADDRESS}/threads"
    assert commands["sse_chat"].startswith("curl -N ")
    for kind in ("json_chat", "sse_chat"):
        assert commands[kind].count(THREAD_PLACEHOLDER) == 1 and README_MESSAGE in commands[kind]


def test_threads_and_the_json_chat_as_written(curl: str, service: ServerProcess, shell_env: dict[str, str]) -> None:
    commands = readme_commands()
    thread_id = new_thread(commands, service, shell_env)
    body = json.loads(run(substitute(commands["json_chat"], service, thread_id), shell_env))
    assert body["responses"] == [f"You said: {README_MESSAGE}"], body
    assert body["thread_id"] == thread_id
    assert body["run_id"].startswith("run_")


def test_the_streamed_chat_as_written(curl: str, service: ServerProcess, shell_env: dict[str, str]) -> None:
    commands = readme_commands()
    thread_id = new_thread(commands, service, shell_env)
    output = run(substitute(commands["sse_chat"], service, thread_id), shell_env)
    events = sse_events(output.splitlines())
    names = [name for name, _ in events]
    assert names[0] == "thread.run.created" and names[-1] == "metadata", names
    text = "".join(data["delta"]["content"] for name, data in events if name == "thread.message.delta")
    assert text == f"You said: {README_MESSAGE}"


def test_the_streamed_chat_delivers_events_as_they_happen(
    curl: str, service: ServerProcess, shell_env: dict[str, str]
) -> None:
    commands = readme_commands()
    thread_id = new_thread(commands, service, shell_env)
    # The README's message is answered at once (the fake echoes it). To see incremental arrival,
    # this one run replaces only the message text with a directive the fake answers slowly: ten
    # deltas, 0.2 s apart. The rest of the command (curl -N, headers, URL) is the README's.
    command = substitute(commands["sse_chat"], service, thread_id)
    assert command.count(README_MESSAGE) == 1
    lines = run_timed_lines(command.replace(README_MESSAGE, SLOW_MESSAGE), shell_env)
    events = sse_events([line for _, line in lines])
    assert events[-1][0] == "metadata", events
    assert "".join(d["delta"]["content"] for n, d in events if n == "thread.message.delta") == SLOW_REPLY
    arrivals = [at for at, line in lines if line == DELTA_LINE]
    assert len(arrivals) == 10
    shown = ", ".join(f"{at - arrivals[0]:.2f}s" for at in arrivals)
    assert arrivals[-1] - arrivals[0] >= 1.2, f"curl printed the deltas together: {shown}"
    # No more than 3 deltas within any 0.1 s: they are printed as they come, not in batches.
    assert all(arrivals[n + 3] - arrivals[n] > 0.1 for n in range(len(arrivals) - 3)), shown
