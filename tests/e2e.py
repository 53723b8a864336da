"""Harness for the end-to-end tests: real servers in real processes, on loopback ports.

`ServerProcess` runs `python -m hypercorn <app>` from the repo root with a given environment,
waits for its health route and stops it (SIGTERM, then SIGKILL). Its output goes to a temp file,
shown when it fails to start and, through `dump_server_logs_on_failure`, when a test fails.

The fixtures are module-scoped so one module's tests share the processes; import them into the
test module (`from tests.e2e import fake_upstream, service  # noqa: F401`).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import fixtures_dir

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_SECONDS = 15.0
STOP_TIMEOUT_SECONDS = 5.0

# Settings a developer's shell may carry that would change what the servers do under test.
_CONFIG_PREFIXES = (
    "OPENAI_", "ASSISTANT_", "TOOL_", "SSE_", "MAX_", "UPSTREAM_", "THREAD_", "SLOW_CLIENT_",
    "SHUTDOWN_", "STREAM_", "SERVICE_API_KEY", "CORS_", "LOG_LEVEL", "FAKE_", "FIXTURES_DIR", "WS_",
)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_hypercorn_args() -> tuple[str, ...]:
    """The Procfile's hypercorn arguments besides the app and `--bind`: the service under test
    starts as it is deployed."""
    command = (REPO / "Procfile").read_text().split("web:", 1)[1].strip()
    words = shlex.split(command)
    assert words[0] == "hypercorn" and "app:app" in words, command
    args = [word for word in words[1:] if word != "app:app"]
    bind = args.index("--bind")
    del args[bind : bind + 2]
    return tuple(args)


def clean_environment(**overrides: str) -> dict[str, str]:
    """The test process's environment without service settings or proxies, plus `overrides`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CONFIG_PREFIXES) and key.lower() not in _PROXY_VARS
    }
    env["PYTHONUNBUFFERED"] = "1"  # logs reach the file as they are written
    env.update(overrides)
    return env


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One `hypercorn <app>` process on a free loopback port."""

    running: list[ServerProcess] = []  # every started, not yet stopped server (for log dumps)

    def __init__(
        self,
        app: str,
        env: Mapping[str, str],
        *,
        health_path: str,
        name: str | None = None,
        hypercorn_args: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.hypercorn_args = hypercorn_args
        self.env = dict(env)
        self.health_path = health_path
        self.name = name or app
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- life cycle

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> ServerProcess:
        for attempt in range(3):  # a free port can be taken between free_port() and bind
            try:
                self._start_once(timeout)
                break
            except ServerStartError as exc:
                if attempt == 2 or "address already in use" not in str(exc).lower():
                    raise
        ServerProcess.running.append(self)
        return self

    def _start_once(self, timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, log_path = tempfile.mkstemp(prefix=f"e2e-{self.name.replace(':', '-')}-", suffix=".log")
        self._log_path = Path(log_path)
        command = [sys.executable, "-m", "hypercorn", self.app, "--bind", f"127.0.0.1:{self.port}", *self.hypercorn_args]
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, for signal_group()
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    output = self.output()
                    self._cleanup()
                    raise ServerStartError(
                        f"{self.name} exited with status {self.proc.returncode} before answering "
                        f"{self.health_path}; its output:\n{output}"
                    )
                try:
                    if client.get(self.url + self.health_path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerStartError(
                        f"{self.name} did not answer {self.url}{self.health_path} within {timeout:g}s; "
                        f"its output:\n{self._last_output}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (hypercorn shuts down gracefully), SIGKILL if it is still up after 5 s."""
        if self in ServerProcess.running:
            ServerProcess.running.remove(self)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._last_output = self.output()
        self._cleanup()

    def signal_group(self, signum: int) -> None:
        """Signal hypercorn and its worker at once, as Heroku, systemd or Ctrl+C do."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def _cleanup(self) -> None:
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- output

    _last_output = ""

    def output(self, offset: int = 0) -> str:
        """What the process wrote to stdout and stderr (from byte `offset`)."""
        if self._log_path is None or not self._log_path.exists():
            return self._last_output[offset:]
        with self._log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    def output_size(self) -> int:
        if self._log_path is None or not self._log_path.exists():
            return 0
        return self._log_path.stat().st_size

    def __repr__(self) -> str:
        return f"<ServerProcess {self.name} {self.url or '(not started)'}>"


def service_environment(upstream_url: str, **overrides: str) -> dict[str, str]:
    """The service's environment for the e2e tests, pointed at the fake upstream."""
    settings = {
        "OPENAI_API_KEY": "sk-e2e-not-a-real-key",
        "OPENAI_BASE_URL": f"{upstream_url}/v1",
        "ASSISTANT_TOOLS": "tests.e2e_tools",
        "ASSISTANT_INITIAL_MESSAGE": "Hello! Ask me anything.",
        "TOOL_TIMEOUT_SECONDS": "1",
        "SSE_HEARTBEAT_SECONDS": "0.2",
        "SSE_RETRY_MS": "1500",
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    settings.update(overrides)
    return clean_environment(**settings)


@contextmanager
def running_service(
    upstream_url: str, name: str = "service", hypercorn_args: tuple[str, ...] = (), **overrides: str
) -> Iterator[ServerProcess]:
    """`start_service` for a `with` block: the service is stopped when the block ends."""
    server = start_service(upstream_url, name, hypercorn_args, **overrides)
    try:
        yield server
    finally:
        server.stop()


def start_service(
    upstream_url: str, name: str = "service", hypercorn_args: tuple[str, ...] = (), **overrides: str
) -> ServerProcess:
    env = service_environment(upstream_url, **overrides)
    args = (*procfile_hypercorn_args(), *hypercorn_args)
    return ServerProcess("app:app", env, health_path="/health", name=name, hypercorn_args=args).start()


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[ServerProcess]:
    """The fake OpenAI (tests/fake_openai.py), replaying the shared recorded fixtures."""
    env = clean_environment(FIXTURES_DIR=str(fixtures_dir()))
    with ServerProcess("tests.fake_openai:app", env, health_path="/_fake/health", name="fake-openai") as fake:
        yield fake


@pytest.fixture(scope="module")
def service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    """The service in front of the fake: e2e tools, 1 s tool timeout, 0.2 s heartbeats."""
    with running_service(fake_upstream.url) as server:
        yield server


@pytest.fixture(scope="module")
def impatient_service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    """A second service that gives up fast: one upstream retry, 0.5 s upstream idle timeout, one tool round."""
    with running_service(
        fake_upstream.url,
        name="impatient-service",
        UPSTREAM_MAX_RETRIES="1",
        UPSTREAM_IDLE_TIMEOUT_SECONDS="0.5",
        MAX_TOOL_ROUNDS="1",
    ) as server:
        yield server


@pytest.fixture(autouse=True)
def dump_server_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print what each running server logged during it (shown by pytest)."""
    offsets = {server: server.output_size() for server in ServerProcess.running}
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        return
    for server in list(ServerProcess.running):
        lines = server.output(offsets.get(server, 0)).splitlines()
        print(f"----- {server.name} ({server.url}) output during the test, last {min(len(lines), 80)} lines -----")
        print("\n".join(lines[-80:]))
