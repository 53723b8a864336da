"""nginx in front of the service, for tests/test_nginx.py: the shipped deploy/nginx.conf, run for real.

`render_config` reads deploy/nginx.conf (an upstream plus a server block, as it would sit in
/etc/nginx/sites-available), puts the test service's address in place of 127.0.0.1:8000 and a free
loopback port in place of `listen 80`, adds ONE test-only location, `/defaults/`, that proxies to
the service with nginx's proxy defaults (HTTP/1.0 to the upstream, buffering on, no extra headers),
and wraps it all in a complete nginx.conf whose pid, logs and temp paths live in a temp folder.
`NginxProxy` runs `nginx -c <that file> -e <tmp>/error.log` in the foreground, waits until it
proxies /health, and stops it with SIGQUIT (then SIGTERM, then SIGKILL).

The fixtures are module-scoped; import them into the test module with the e2e ones:
`from tests.nginx_proxy import nginx_binary, nginx_logs_on_failure, nginx_proxy, nginx_service  # noqa: F401`.
Without nginx the tests skip, unless the environment variable CI is set: then they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e import REPO, ServerProcess, free_port, running_service

DEPLOY_CONF = REPO / "deploy" / "nginx.conf"
SHIPPED_UPSTREAM = "127.0.0.1:8000"  # the service's address as deploy/nginx.conf has it
SERVICE_HEARTBEAT_SECONDS = "0.5"
STARTUP_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # not on a non-root user's PATH on Debian


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path=os.pathsep.join(SBIN_DIRS))


def require_nginx() -> str:
    """The nginx binary; skips the test without one, or fails it when CI is set (CI must run it)."""
    nginx = find_nginx()
    if nginx is None:
        reason = "nginx is not installed (apt-get install nginx): the nginx deployment tests need it"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set, so they may not be skipped", pytrace=False)
        pytest.skip(reason)
    return nginx


# ---------------------------------------------------------------------------------------------
# The configuration


def _server_block_end(text: str) -> int:
    """The offset of the closing brace of the (one) top-level `server {` block of `text`."""
    depth = 0
    in_server = False
    token_start = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "#":  # a comment runs to the end of the line
            i = text.find("\n", i)
            if i < 0:
                break
        elif char in "\"'":  # a quoted string may hold braces
            i = text.index(char, i + 1)
        elif char == "{":
            if depth == 0 and text[token_start:i].split()[:1] == ["server"]:
                in_server = True
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and in_server:
                return i
        if char in "{};":
            token_start = i + 1
        i += 1
    raise ValueError(f"{DEPLOY_CONF} has no top-level server {{ ... }} block")


def render_server_block(shipped: str, *, upstream: str, port: int, defaults_extra: str = "") -> str:
    """deploy/nginx.conf with the service's address and the test port put in, plus the test-only
    locations: `/defaults/`, `/unreachable/` (nothing listens) and `/impatient/` (1 s timeout)."""
    upstream_servers = re.findall(rf"^\s*server\s+{re.escape(SHIPPED_UPSTREAM)}\s*;", shipped, re.M)
    assert len(upstream_servers) == 1, f"{DEPLOY_CONF}: expected one `server {SHIPPED_UPSTREAM};` in its upstream"
    text = shipped.replace(SHIPPED_UPSTREAM, upstream)
    listens = re.findall(r"^\s*listen\s[^;]*;", text, re.M)
    assert len(listens) == 1, f"{DEPLOY_CONF}: expected one listen directive, found {listens}"
    text = re.sub(r"^(\s*)listen\s[^;]*;", rf"\g<1>listen 127.0.0.1:{port};", text, flags=re.M)
    # Test only: no proxy_* directive of the shipped file applies here (they are all inside its
    # locations), so this is nginx's default proxying: HTTP/1.0 and "Connection: close" to the
    # service, proxy buffering on. Only the service's X-Accel-Buffering header can make it stream.
    defaults = (
        "\n    # test only (tests/nginx_proxy.py): nginx's proxy defaults\n"
        "    location /defaults/ {\n"
        f"        proxy_pass http://{upstream}/;\n"
        + (f"        {defaults_extra}\n" if defaults_extra else "")
        + "    }\n"
        # test only: nginx's own 502 (nothing listens there) and 504 (1 s of silence)
        "    location /unreachable/ {\n"
        f"        proxy_pass http://127.0.0.1:{free_port()}/;\n"
        "    }\n"
        "    location /impatient/ {\n"
        f"        proxy_pass http://{upstream}/;\n"
        "        proxy_read_timeout 1s;\n"
        "    }\n"
    )
    end = _server_block_end(text)
    return text[:end] + defaults + text[end:]


def temp_paths(tmp: Path) -> str:
    """http-level directives moving nginx's temp files under `tmp`: the compiled-in paths are under
    /var/lib/nginx, which a test may not write."""
    return "".join(
        f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def render_config(tmp: Path, *, upstream: str, port: int, defaults_extra: str = "") -> str:
    """A complete nginx.conf around the shipped server block; every file it writes is under `tmp`."""
    server = render_server_block(DEPLOY_CONF.read_text(), upstream=upstream, port=port, defaults_extra=defaults_extra)
    return f"""\
# generated by tests/nginx_proxy.py from {DEPLOY_CONF}
daemon off;
master_process on;
worker_processes 1;
error_log {tmp}/error.log info;
pid {tmp}/nginx.pid;

events {{
    worker_connections 256;
}}

http {{
    access_log {tmp}/access.log;
{temp_paths(tmp)}
{server}
}}
"""


# ---------------------------------------------------------------------------------------------
# The process


class NginxStartError(RuntimeError):
    pass


class NginxProxy:
    """One nginx master (and its worker) on a free loopback port, in front of `service`."""

    running: list[NginxProxy] = []

    def __init__(self, service: ServerProcess, *, defaults_extra: str = "", nginx: str | None = None) -> None:
        self.service = service
        self.defaults_extra = defaults_extra
        self.nginx = nginx or require_nginx()
        self.port = 0
        self.url = ""
        self.tmp: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._last_log = ""

    @property
    def prefixed_url(self) -> str:
        return f"{self.url}/assistant"

    @property
    def defaults_url(self) -> str:
        return f"{self.url}/defaults"

    @property
    def config_path(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "nginx.conf"

    def start(self) -> NginxProxy:
        for attempt in range(3):  # a free port can be taken between free_port() and bind()
            try:
                self._start_once()
                break
            except NginxStartError as exc:
                if attempt == 2 or "address already in use" not in str(exc).lower():
                    raise
        NginxProxy.running.append(self)
        return self

    def _start_once(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        if os.geteuid() == 0:
            # As root, nginx's worker runs as `nobody`: let it reach the temp dirs nginx creates.
            self.tmp.chmod(0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        upstream = self.service.url.removeprefix("http://")
        self.config_path.write_text(
            render_config(self.tmp, upstream=upstream, port=self.port, defaults_extra=self.defaults_extra)
        )
        command = [self.nginx, "-p", f"{self.tmp}/", "-c", str(self.config_path), "-e", f"{self.tmp}/error.log"]
        with (self.tmp / "output.log").open("wb") as output:
            self.proc = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    log = self.log()
                    self._cleanup()
                    raise NginxStartError(f"nginx exited with status {self.proc.returncode}; its log:\n{log}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise NginxStartError(
                        f"nginx did not proxy {self.url}/health within {STARTUP_TIMEOUT_SECONDS:g}s; "
                        f"its log:\n{self._last_log}"
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGQUIT (graceful: open requests finish), SIGTERM (fast), then SIGKILL to the group."""
        if self in NginxProxy.running:
            NginxProxy.running.remove(self)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for signum in (signal.SIGQUIT, signal.SIGTERM):
                proc.send_signal(signum)
                try:
                    proc.wait(STOP_TIMEOUT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the master and its workers
                proc.wait()
        self._last_log = self.log()
        self._cleanup()

    def log(self) -> str:
        """nginx's error log and anything it printed."""
        if self.tmp is None:
            return self._last_log
        parts = []
        for name in ("output.log", "error.log"):
            path = self.tmp / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def _cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> NginxProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NginxProxy {self.url or '(not started)'} -> {self.service.url}>"


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return require_nginx()


@pytest.fixture(scope="module")
def nginx_service(nginx_binary: str, fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    """The service behind nginx: in front of the fake, `: keepalive` every 0.5 s."""
    with running_service(fake_upstream.url, name="nginx-service", SSE_HEARTBEAT_SECONDS=SERVICE_HEARTBEAT_SECONDS) as server:
        yield server


@pytest.fixture(scope="module")
def nginx_proxy(nginx_binary: str, nginx_service: ServerProcess) -> Iterator[NginxProxy]:
    """nginx running deploy/nginx.conf in front of `nginx_service`: `.url`, `.prefixed_url`, `.defaults_url`."""
    with NginxProxy(nginx_service, nginx=nginx_binary) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def nginx_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print the error log of each running nginx."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        return
    for proxy in list(NginxProxy.running):
        lines = proxy.log().splitlines()
        print(f"----- nginx {proxy.url} error log, last {min(len(lines), 40)} lines -----")
        print("\n".join(lines[-40:]))
