"""The service's performance benchmark: one command, one table.

    python bench/run.py [--quick] [--pin] [--transport sse|ws|both] [--streams N] [--deltas N]
                        [--rate R] [--idle-streams N] [--scenarios ABCDEFG] [--worker-class uvloop]
                        [--conventional PYTHON] [--json FILE]

It starts bench/fast_upstream.py (a fake OpenAI that costs little CPU, whose deltas carry their
send time) and the service exactly as the Procfile does (its command, bound to 127.0.0.1
instead of $PORT), then drives it with bench/load.py, a separate process, once per scenario:

  A  one stream at full rate (rate=0)                 CPU per delta at best (events batch up)
  B  --streams x --deltas at --rate (200 x 50 at 20/s) CPU per delta all-in, per turn, latency, TTFD
     B1 is the same clients with 1-delta turns: it prices a turn alone, to split B's CPU into
        per-turn and per-delta (two equations, two unknowns)
  C  1,000 streams x 10 deltas/s for 60 s              errors and latency, sustained
  D  --idle-streams held open on a stalled upstream    RSS per open idle stream (heartbeats on)
  E  --churn-clients each running 5-delta turns back  memory under connection churn: whether RSS
     to back for --churn-seconds, a new connection      levels off (closed connections are freed
     per turn                                           by the garbage collector's full collections)
  G  1,000 streams x 10 deltas/s in 30 s turns, back  latency where streams end and begin all the
     to back for 60 s, a new connection per turn        time (~33 turns a second with all open)
  F  D's then B's load (SSE) against bench/floor.py's the floors: what a plain asyncio relay, and a
     relays instead of the service                      bare ASGI relay under hypercorn, cost per delta
                                                        and per idle stream; with --conventional, also
                                                        bench/conventional.py (the build the targets
                                                        were set against), for reference

CPU is the service's (every process its command started: one, as hypercorn_config.py says
`workers = 0`), from /proc/<pid>/stat utime+stime, over the measured part only (threads are
created before it). RSS is the serving process's VmRSS ("worker RSS" in the table). D runs
on a fresh service per transport, after a small warm-up, so memory freed by earlier scenarios
cannot hide what the idle streams cost (E and G as well: what they measure starts from a known state). With --pin the service runs on the first CPU, the fake
upstream, the load and this script on the second, so the service's figures are one core's.

--quick runs every scenario at a tiny size, through the full path, in seconds (CI's smoke test):
its figures mean nothing. Exit status: 0 when no scenario counted an error, 1 otherwise; targets
not met are reported in the table, not in the exit status.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTUP_TIMEOUT_SECONDS = 30.0

# Settings a developer's shell may carry that would change what the service does (as tests/e2e.py).
_CONFIG_PREFIXES = (
    "OPENAI_", "ASSISTANT_", "TOOL_", "SSE_", "MAX_", "UPSTREAM_", "THREAD_", "SLOW_CLIENT_",
    "SHUTDOWN_", "STREAM_", "SERVICE_API_KEY", "CORS_", "LOG_LEVEL", "FAKE_", "FIXTURES_DIR", "WS_",
)
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

# The task's targets.
CPU_PER_DELTA_US = 25.0
CPU_PER_TURN_MS = 3.0
LATENCY_P99_MS = 20.0
TTFD_P50_MS = 2.0
SUSTAINED_P99_MS = 50.0
IDLE_KIB_PER_STREAM = 32.0
WS_FACTOR = 1.5


# -- /proc


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, living and exited)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_user_system_seconds(cpus: set[int] | None) -> float:
    """user + nice + system time of these CPUs (all of them if None), from /proc/stat."""
    names = {"cpu"} if not cpus else {f"cpu{n}" for n in cpus}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in names:
                total += int(fields[1]) + int(fields[2]) + int(fields[3])
    return total / CLK_TCK


def connections_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:<port> on this machine (only the service calls the
    fake). Counted once per address pair: the kernel writes these tables a page at a time, so a
    read while connections come and go can show a connection twice (a full run once counted
    1,014 against the pool's 1,000)."""
    wanted = f":{port:04X}"
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split(None, 4)
                    if fields[2].endswith(wanted) and fields[3] == "01":
                        established.add((fields[1], fields[2]))
        except OSError:
            pass
    return len(established)


class Sampler:
    """Samples a figure in a background thread while a scenario runs: every (time, value), and the peak."""

    def __init__(self, sample: Any, interval: float = 0.25) -> None:
        self.sample, self.interval, self.peak = sample, interval, 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.sample()
            self.samples.append((time.monotonic(), value))
            self.peak = max(self.peak, value)
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- processes


def raise_fd_limit() -> None:
    """Children inherit it: 1,000 streams need over 2,000 sockets in the service alone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def launch(command: list[str], cpus: set[int] | None, **kwargs: Any) -> subprocess.Popen:
    """Start a process on `cpus`; the affinity is set before exec, so whatever it spawns inherits it."""
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(command, preexec_fn=pin, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, extra_pids: list[int] = ()) -> None:
    """SIGTERM (hypercorn then stops its worker, if it has one), then SIGKILL whatever of ours is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in extra_pids:
        if "multiprocessing" in cmdline(pid):  # still ours (a pid can be reused once it exits)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def http_request(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain request (http.client: no proxy from the environment can get in the way)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream:
    """bench/fast_upstream.py, on a port it picks itself."""

    def __init__(self, cpus: set[int] | None) -> None:
        self.proc = launch([sys.executable, str(BENCH / "fast_upstream.py"), "--port", "0"], cpus,
                           stdout=subprocess.PIPE, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            stop(self.proc)
            raise RuntimeError(f"the fast upstream did not start: {line!r}")
        self.port = int(line.split()[1])

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def release_stalls(self) -> None:
        http_request(self.port, "POST", "/_bench/release")

    def stop(self) -> None:
        stop(self.proc)


def procfile_command(bind: str) -> list[str]:
    """The Procfile's web command (`hypercorn ...`) bound to `bind` instead of $PORT."""
    words = shlex.split((REPO / "Procfile").read_text().split("web:", 1)[1])
    words[words.index("--bind") + 1] = bind
    return words


class Service:
    """The service as the Procfile starts it, in front of the fast upstream; or with `floor`, one
    of bench/floor.py's relays in its place ("raw": plain asyncio; "hypercorn": a bare ASGI app)."""

    def __init__(self, upstream: Upstream, cpus: set[int] | None, worker_class: str | None = None,
                 floor: str | None = None, settings: dict[str, str] | None = None,
                 conventional_python: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_CONFIG_PREFIXES) and k.lower() not in _PROXY_VARS}
        env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1",
                   LOG_LEVEL="WARNING", SSE_HEARTBEAT_SECONDS="15", PYTHONUNBUFFERED="1", **(settings or {}))
        if floor:
            env["FLOOR_UPSTREAM"] = f"http://127.0.0.1:{upstream.port}"
        self.label = {"raw": "the raw floor", "hypercorn": "the hypercorn floor",
                      "conventional": "the conventional build"}.get(floor or "", "the service")
        for attempt in range(3):  # the free port can be taken before hypercorn binds it
            fd, log_path = tempfile.mkstemp(prefix="bench-service-", suffix=".log")
            self.log_path = Path(log_path)
            self.port = free_port()
            if floor == "raw":
                command = [sys.executable, str(BENCH / "floor.py"), "--upstream", env["FLOOR_UPSTREAM"],
                           "--port", str(self.port)]
            elif floor == "hypercorn":
                command = [sys.executable, "-m", "hypercorn", "bench.floor:app", "--bind", f"127.0.0.1:{self.port}"]
            elif floor == "conventional":
                command = [conventional_python or "python", "-m", "uvicorn", "bench.conventional:app", "--host",
                           "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
            else:
                command = [sys.executable, "-m", *procfile_command(f"127.0.0.1:{self.port}")]
            if worker_class:
                command += ["--worker-class", worker_class]
            with os.fdopen(fd, "wb") as log:
                self.proc = launch(command, cpus, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
            try:
                self._wait_healthy()
                break
            except RuntimeError as exc:
                if attempt == 2 or "address already in use" not in str(exc).lower():
                    raise
        # The service serves from its one process (hypercorn_config.py: `workers = 0`); the bare
        # hypercorn floor from the worker its parent spawns (beside multiprocessing's resource tracker).
        self.pids = [self.proc.pid, *descendants(self.proc.pid)]
        workers = [p for p in self.pids if "spawn_main" in cmdline(p)] if floor == "hypercorn" else [self.proc.pid]
        if len(workers) != 1:
            self.stop()
            raise RuntimeError(f"{self.label}: expected one hypercorn worker, found {workers}")
        self.worker = workers[0]

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if http_request(self.port, "GET", "/health", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.label} did not answer /health in time:\n{self.log_tail()}")

    def cpu(self) -> float:
        """Parent + worker + resource tracker: every process the service's command started."""
        try:
            return sum(proc_cpu_seconds(p) for p in self.pids)
        except FileNotFoundError:
            self.check_alive()
            raise

    def check_alive(self) -> None:
        """Raise, saying so, when the server (or its worker) has exited: a load run's own error
        would only say that its connections failed."""
        if self.proc.poll() is not None or not os.path.exists(f"/proc/{self.worker}"):
            raise RuntimeError(f"{self.label} exited (status {self.proc.poll()}):\n{self.log_tail()}")

    def rss_kib(self) -> int:
        try:
            return proc_rss_kib(self.worker)
        except FileNotFoundError:
            self.check_alive()
            raise

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def warnings(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if '"level":"WARNING"' in line or '"level":"ERROR"' in line)

    def stop(self) -> None:
        stop(self.proc, [p for p in self.pids if p != self.proc.pid] if hasattr(self, "pids") else [])


# -- one load run


@dataclass
class LoadRun:
    """What bench/load.py reported, plus what this process measured around it."""

    result: dict[str, Any]
    service_cpu: float
    upstream_cpu: float
    wall: float
    rss_before_kib: int = 0
    rss_open_kib: int = 0
    rss_after_kib: int = 0
    foreign_cpu: float = 0.0  # CPU time of processes not ours, where the service runs
    peak_upstream_connections: int = 0  # the service's pool toward the fake (max_connections=1000)
    rss_samples: list[tuple[float, int]] | None = None  # (seconds into the run, worker KiB), once a second

    @property
    def foreign_core_percent(self) -> float:
        """Other processes on the service's core (pinned) or the machine: the figures' noise."""
        return max(0.0, 100 * self.foreign_cpu / self.wall) if self.wall else 0.0

    @property
    def errors(self) -> int:
        return self.result["error_count"]

    @property
    def deltas(self) -> int:
        return self.result["delta_count"]

    @property
    def turns(self) -> int:
        return len(self.result["turns"])

    def latencies_ms(self, steady: bool = False) -> list[float]:
        samples = self.result["samples"]
        if steady:
            window = self.steady_window()
            if window is None:
                return []
            lo, hi = window
            samples = [s for s in samples if lo <= s[0] + s[1] <= hi]
        return sorted(latency * 1000 for _, latency in samples)

    def ttfd_ms(self, overhead: bool = False) -> list[float]:
        """Time to first delta; with `overhead`, less the upstream's own time (request read -> sent)."""
        return sorted((t[1] - (t[3] if overhead else 0.0)) * 1000 for t in self.result["turns"] if t[1] is not None)

    def steady_window(self) -> tuple[float, float] | None:
        """From when every stream has started streaming to when the first one ends: full concurrency."""
        turns = [t for t in self.result["turns"] if t[1] is not None and t[2] is not None]
        if not turns:
            return None
        lo, hi = max(t[0] + t[1] for t in turns), min(t[2] for t in turns)
        return (lo, hi) if hi - lo > 0.2 else None

    def deltas_per_second(self) -> float:
        """In the steady window if there is one (the ramp would lower it), else over the whole run."""
        received = [s + latency for s, latency in self.result["samples"]]
        if not received:
            return 0.0
        window = self.steady_window()
        if window is not None:
            lo, hi = window
            return sum(1 for r in received if lo <= r <= hi) / (hi - lo)
        span = max(received) - min(received)
        return len(received) / span if span > 0 else 0.0

    def load_side_core_percent(self) -> float:
        """Upstream + load CPU over wall time: near 100 % means the clients, not the service, set the pace."""
        return 100 * (self.upstream_cpu + self.result["load_cpu_seconds"]) / self.wall if self.wall else 0.0


@dataclass
class Bench:
    args: argparse.Namespace
    service_cpus: set[int] | None
    load_cpus: set[int] | None
    upstream: Upstream | None = None
    warnings: int = 0  # service log lines at WARNING or above, over every service started

    def load(self, service: Service, transport: str, streams: int, deltas: int, rate: float, *,
             stall: float = 0.0, ramp: float = 0.0, hold: float | None = None, duration: float = 0.0,
             keep_full_collections: bool = False) -> LoadRun:
        assert self.upstream is not None
        stalled = stall if hold is None else 0.0  # with hold, run.py releases the stall itself
        command = [
            sys.executable, str(BENCH / "load.py"), "--url", f"http://127.0.0.1:{service.port}",
            "--transport", transport, "--streams", str(streams), "--deltas", str(deltas), "--rate", str(rate),
            "--stall", str(stall), "--ramp", str(ramp), "--ws-compression", self.args.ws_compression,
            "--turn-timeout", str(120 + ramp + stalled + (deltas / rate if rate else 0)),
            "--duration", str(duration),
        ]
        if hold is not None:
            command.append("--hold")
        if keep_full_collections:
            command.append("--keep-full-collections")
        with tempfile.TemporaryFile() as stderr:
            proc = launch(command, self.load_cpus, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=stderr, text=True)
            try:
                def expect(word: str) -> None:
                    line = proc.stdout.readline().strip()
                    if line != word:
                        proc.wait(10)
                        service.check_alive()
                        stderr.seek(0)
                        raise RuntimeError(f"load.py said {line!r}, not {word}:\n{stderr.read().decode()[-3000:]}")

                expect("READY")
                time.sleep(self.args.settle)  # thread creation's connections close before the measurement
                rss_before = service.rss_kib()
                busy0 = cpu_user_system_seconds(self.service_cpus)
                cpu0, up0, t0 = service.cpu(), self.upstream.cpu(), time.monotonic()
                proc.stdin.write("GO\n")
                proc.stdin.flush()
                rss_open = 0
                with Sampler(lambda: connections_to(self.upstream.port)) as upstream_connections, \
                        Sampler(service.rss_kib, interval=1.0) as rss:
                    if hold is not None:
                        expect("OPEN")
                        time.sleep(hold)
                        rss_open = service.rss_kib()
                        self.upstream.release_stalls()
                    line = proc.stdout.readline()
                proc.wait(30)
                # The service finishes closing the streams' connections after the last byte: count it.
                time.sleep(self.args.settle)
                cpu1, up1, busy1 = service.cpu(), self.upstream.cpu(), cpu_user_system_seconds(self.service_cpus)
                wall = time.monotonic() - t0
                if proc.returncode != 0 or not line.startswith("{"):
                    stderr.seek(0)
                    service.check_alive()
                    raise RuntimeError(f"load.py failed ({proc.returncode}):\n{stderr.read().decode()[-3000:]}")
                run = LoadRun(json.loads(line), cpu1 - cpu0, up1 - up0, wall, rss_before, rss_open, service.rss_kib())
                if self.args.keep_raw:
                    self.args.keep_raw.mkdir(parents=True, exist_ok=True)
                    runs = len(list(self.args.keep_raw.glob("*.json")))
                    name = f"{runs + 1:02d}-{transport}-{streams}x{deltas}-rate{rate:g}.json"
                    (self.args.keep_raw / name).write_text(line)
                ours = run.service_cpu
                if not self.service_cpus:  # unpinned: everything of ours counts, machine-wide
                    ours += run.upstream_cpu + run.result["load_cpu_seconds"]
                run.foreign_cpu = busy1 - busy0 - ours
                run.peak_upstream_connections = upstream_connections.peak
                run.rss_samples = [(at - t0, kib) for at, kib in rss.samples]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return run


# -- the table


@dataclass
class Row:
    scenario: str
    transport: str
    figure: str
    value: str
    target: str = ""
    verdict: str = ""


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


class Table:
    def __init__(self, quick: bool) -> None:
        self.quick = quick  # tiny sizes: only the error counts mean anything
        self.rows: list[Row] = []
        self._sse: dict[tuple[str, str], float | None] = {}  # (scenario, figure) -> SSE value

    def add(self, scenario: str, transport: str, figure: str, value: float | None, unit: str,
            limit: float | None = None, digits: int = 1, vs_sse: bool = False) -> None:
        """A figure; with `limit` it is checked (<=), with `vs_sse` a WS figure must be within 1.5x SSE's."""
        shown = "-" if value is None else f"{value:.{digits}f} {unit}".rstrip()
        target, verdict = "", ""
        if transport == "sse":
            self._sse[(scenario, figure)] = value
        if limit is not None:
            target = "0" if limit == 0 else f"<= {limit:g} {unit}".rstrip()
            ok = value is not None and value <= limit
            sse_value = self._sse.get((scenario, figure)) if transport == "ws" and vs_sse else None
            if sse_value is not None:
                target += f", <= {WS_FACTOR:g}x SSE"
                ok = ok and value is not None and value <= WS_FACTOR * sse_value
            verdict = "ok" if ok else "NOT MET"
            if self.quick and limit != 0:
                verdict = "(quick)"
        self.rows.append(Row(scenario, transport, figure, shown, target, verdict))

    def note(self, scenario: str, transport: str, figure: str, text: str) -> None:
        self.rows.append(Row(scenario, transport, figure, text))

    def render(self) -> str:
        header = Row("scenario", "transport", "figure", "value", "target", "ok")
        rows = [header, *self.rows]
        widths = [max(len(getattr(r, f)) for r in rows) for f in ("scenario", "transport", "figure", "value", "target")]
        lines = []
        for n, r in enumerate(rows):
            cells = [getattr(r, f).ljust(w) for f, w in zip(("scenario", "transport", "figure", "value", "target"), widths)]
            lines.append(" | ".join([*cells, r.verdict]).rstrip())
            if n == 0:
                lines.append("-+-".join("-" * w for w in [*widths, 7]))
        return "\n".join(lines)


def add_latency(table: Table, name: str, transport: str, run: LoadRun, p99_limit: float,
                detail: bool, steady: bool = True) -> None:
    lat = run.latencies_ms()
    table.add(name, transport, "latency p50", pct(lat, 50), "ms", digits=2)
    if detail:
        table.add(name, transport, "latency p90", pct(lat, 90), "ms", digits=2)
    table.add(name, transport, "latency p99", pct(lat, 99), "ms", p99_limit, digits=2, vs_sse=True)
    table.add(name, transport, "latency max", lat[-1] if lat else None, "ms", digits=2)
    if steady:
        all_open = run.latencies_ms(steady=True)
        table.add(name, transport, "latency p99, all streams open", pct(all_open, 99), "ms", digits=2)


def add_common(table: Table, name: str, transport: str, run: LoadRun) -> None:
    table.add(name, transport, "deltas/s", run.deltas_per_second(), "/s", digits=0)
    load_side = run.load_side_core_percent()
    table.add(name, transport, "load-side CPU (upstream + load)", load_side, "% core", digits=0)
    table.add(name, transport, "CPU of other processes (noise)", run.foreign_core_percent, "% core", digits=0)
    table.add(name, transport, "errors", run.errors, "", 0, digits=0)


def add_pool(table: Table, name: str, transport: str, run: LoadRun) -> None:
    """The service's upstream pool allows 1,000 connections (assistant/upstream.py): how close it came."""
    table.add(name, transport, "peak upstream connections (pool max 1000)", run.peak_upstream_connections, "",
              digits=0)


def add_churn(table: Table, name: str, transport: str, run: LoadRun) -> None:
    """Whether memory levels off while connections come and go: RSS along the run, and its slope
    over the second half (a leak, or garbage waiting ever longer for a full collection, shows there)."""
    table.add(name, transport, "turns/s (a new connection each)", run.turns / run.wall, "/s", digits=0)
    table.add(name, transport, "service CPU busy", 100 * run.service_cpu / run.wall, "% core", digits=0)
    table.add(name, transport, "worker RSS before (warmed up)", run.rss_before_kib / 1024, "MiB")
    samples = run.rss_samples or [(0.0, run.rss_before_kib)]
    end = samples[-1][0]
    middle = min(samples, key=lambda sample: abs(sample[0] - end / 2))
    table.add(name, transport, "worker RSS at half-time", middle[1] / 1024, "MiB")
    table.add(name, transport, "worker RSS at the end", samples[-1][1] / 1024, "MiB")
    table.add(name, transport, "worker RSS peak", max(kib for _, kib in samples) / 1024, "MiB")
    slope = (samples[-1][1] - middle[1]) / 1024 / (end - middle[0]) * 60 if end > middle[0] else None
    table.add(name, transport, "RSS growth over the second half", slope, "MiB/min")
    table.add(name, transport, "worker RSS after they closed", run.rss_after_kib / 1024, "MiB")
    table.add(name, transport, "errors", run.errors, "", 0, digits=0)


# -- scenarios


def service_setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every scenario at a tiny size (smoke test)")
    parser.add_argument("--pin", action="store_true", help="service on the first CPU; upstream, load, this on the second")
    parser.add_argument("--transport", choices=("sse", "ws", "both"), default="both")
    parser.add_argument("--streams", type=int, help="B: concurrent streams (default 200)")
    parser.add_argument("--deltas", type=int, help="B: deltas per stream (default 50)")
    parser.add_argument("--rate", type=float, help="B: deltas/s per stream (default 20)")
    parser.add_argument("--idle-streams", type=int, help="D: idle streams held open (default 1000)")
    parser.add_argument("--sustained-streams", type=int, help="C: concurrent streams (default 1000)")
    parser.add_argument("--sustained-seconds", type=float, help="C: length of each stream at 10 deltas/s (default 60: long enough to include full garbage collections)")
    parser.add_argument("--churn-clients", type=int, help="E: clients running turns back to back (default 50)")
    parser.add_argument("--churn-seconds", type=float, help="E: how long they do (default 60)")
    parser.add_argument("--turnover-streams", type=int, help="G: concurrent streams (default 1000)")
    parser.add_argument("--turnover-seconds", type=float, help="G: how long each client starts new turns (default 60)")
    parser.add_argument("--full-rate-deltas", type=int, help="A: deltas of the one full-rate stream (default 5000)")
    parser.add_argument("--ramp", type=float, help="B, C and G: seconds over which clients start "
                        "(default: half a stream's length, at most 5 s; G: a turn's length)")
    parser.add_argument("--scenarios", default="ABCDEFG", help="which to run, e.g. BD (default ABCDEFG)")
    parser.add_argument("--ws-compression", choices=("on", "off"), default="on",
                        help="the WebSocket clients offer permessage-deflate as browsers do (default on; the "
                             "service declines it unless --service-setting WS_COMPRESSION=on)")
    parser.add_argument("--service-setting", type=service_setting, action="append", default=[],
                        metavar="NAME=VALUE", help="a setting of the service's, e.g. WS_COMPRESSION=on (repeatable)")
    parser.add_argument("--worker-class", choices=("asyncio", "uvloop"),
                        help="hypercorn's --worker-class (default: none, as in the Procfile), to compare loops")
    parser.add_argument("--conventional", metavar="PYTHON",
                        help="F also measures bench/conventional.py (FastAPI, sse-starlette, the openai SDK on "
                             "uvicorn) run by this interpreter, whose virtualenv has those packages")
    parser.add_argument("--json", type=Path, help="also write the table's rows to this file")
    parser.add_argument("--keep-raw", type=Path, metavar="DIR", help="keep each load run's raw results (JSON) here")
    args = parser.parse_args()

    quick = args.quick
    b_streams = args.streams or (5 if quick else 200)
    b_deltas = args.deltas or (5 if quick else 50)
    b_rate = args.rate or 20.0
    c_streams = args.sustained_streams or (10 if quick else 1000)
    c_deltas = max(1, round(10 * (args.sustained_seconds or (0.5 if quick else 60.0))))
    d_streams = args.idle_streams or (20 if quick else 1000)
    a_deltas = args.full_rate_deltas or (100 if quick else 5000)
    e_clients = args.churn_clients or (5 if quick else 50)
    e_seconds = args.churn_seconds or (0.5 if quick else 60.0)
    g_streams = args.turnover_streams or (10 if quick else 1000)
    g_deltas = 5 if quick else 300
    g_seconds = args.turnover_seconds or (0.5 if quick else 60.0)
    hold = 0.2 if quick else 3.0
    args.settle = 0.05 if quick else 0.3

    def ramp_for(deltas: int, rate: float) -> float:
        if args.ramp is not None:
            return args.ramp
        return 0.1 if quick else min(5.0, deltas / rate / 2)

    transports = ["sse", "ws"] if args.transport == "both" else [args.transport]
    scenarios = args.scenarios.upper()

    raise_fd_limit()
    service_cpus = load_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin needs two CPUs", file=sys.stderr)
            return 2
        service_cpus, load_cpus = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, load_cpus)

    bench = Bench(args, service_cpus, load_cpus)
    table = Table(quick)
    print(f"benchmark: {'quick (figures meaningless)' if quick else 'full'}; "
          f"{'service on CPU %s, upstream + load on CPU %s' % (min(service_cpus), min(load_cpus)) if args.pin else 'not pinned'}; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}; WS clients offer compression: "
          f"{args.ws_compression}"
          f"{''.join(f'; {name}={value}' for name, value in args.service_setting)}"
          f"{'; hypercorn --worker-class ' + args.worker_class if args.worker_class else ''}",
          flush=True)

    def progress(text: str) -> None:
        print(f"  .. {text}", file=sys.stderr, flush=True)

    services: list[Service] = []

    def new_service() -> Service:
        service = Service(bench.upstream, service_cpus, args.worker_class, settings=dict(args.service_setting))
        services.append(service)
        return service

    def retire(service: Service) -> None:
        bench.warnings += service.warnings()
        service.stop()

    error_reasons: list[tuple[str, int, str]] = []  # (scenario and transport, count, reason): under the table

    def count_errors(label: str, transport: str, *runs: LoadRun) -> None:
        for run in runs:
            for reason, count in sorted(run.result["errors"].items(), key=lambda item: -item[1]):
                error_reasons.append((f"{label} {transport}", count, reason))

    try:
        bench.upstream = Upstream(load_cpus)

        # D first, each transport on a fresh service: freed memory of other runs would mask its cost.
        if "D" in scenarios:
            for transport in transports:
                progress(f"D {transport}: {d_streams} idle streams")
                service = new_service()
                bench.load(service, transport, min(20, d_streams), 5, 0)  # warm-up: imports, pools
                run = bench.load(service, transport, d_streams, 2, 0, stall=600, ramp=0.1 if quick else 2.0,
                                 hold=hold)
                count_errors("D", transport, run)
                name = "D idle"
                table.add(name, transport, "worker RSS before (warmed up)", run.rss_before_kib / 1024, "MiB")
                table.add(name, transport, f"worker RSS, {d_streams} streams open", run.rss_open_kib / 1024, "MiB")
                per_stream = (run.rss_open_kib - run.rss_before_kib) / d_streams
                table.add(name, transport, "RSS per open idle stream", per_stream, "KiB", IDLE_KIB_PER_STREAM,
                          vs_sse=True)
                table.add(name, transport, "worker RSS after they closed", run.rss_after_kib / 1024, "MiB")
                add_pool(table, name, transport, run)
                table.add(name, transport, "errors", run.errors, "", 0, digits=0)
                retire(service)

        # E on a fresh service too: its figure is how memory moves from a known start.
        if "E" in scenarios:
            for transport in transports:
                progress(f"E {transport}: {e_clients} clients running turns for {e_seconds:g} s, a connection each")
                service = new_service()
                bench.load(service, transport, min(20, e_clients), 5, 0)  # warm-up: imports, pools
                run = bench.load(service, transport, e_clients, 5, 0, duration=e_seconds, keep_full_collections=True)
                count_errors("E", transport, run)
                add_churn(table, "E churn", transport, run)
                retire(service)

        # A, B and C share one service (started only if one of them runs), in that order.
        if set("ABC") & set(scenarios):
            service = new_service()
            bench.load(service, "sse", 2, 2, 0)  # warm-up
        for transport in transports:
            if "A" in scenarios:
                progress(f"A {transport}: 1 stream x {a_deltas} deltas at full rate")
                run = bench.load(service, transport, 1, a_deltas, 0)
                count_errors("A", transport, run)
                name = "A full rate"
                table.add(name, transport, "CPU per delta (1 stream)", 1e6 * run.service_cpu / max(1, run.deltas), "us")
                start, _, end, _ = run.result["turns"][0]
                table.add(name, transport, "deltas/s (whole turn)", run.deltas / (end - start) if end else None, "/s",
                          digits=0)
                table.add(name, transport, "time to first delta, service idle", pct(run.ttfd_ms(), 50), "ms",
                          digits=2)
                table.add(name, transport, "errors", run.errors, "", 0, digits=0)

        for transport in transports:
            if "B" in scenarios:
                ramp = ramp_for(b_deltas, b_rate)
                progress(f"B {transport}: {b_streams} x 1 delta, then {b_streams} x {b_deltas} deltas at {b_rate:g}/s")
                one = bench.load(service, transport, b_streams, 1, b_rate, ramp=ramp)
                run = bench.load(service, transport, b_streams, b_deltas, b_rate, ramp=ramp)
                count_errors("B", transport, one, run)
                name = f"B {b_streams}x{b_deltas}@{b_rate:g}/s"
                turns = run.turns
                all_in = run.service_cpu / max(1, run.deltas)
                # B1: cpu1 = T*turn + T*1*delta; B: cpu = T*turn + D*delta (D = deltas of B).
                d_extra = run.deltas - one.deltas
                per_delta = (run.service_cpu - one.service_cpu) / d_extra if d_extra > 0 else None
                per_turn = (one.service_cpu - (per_delta or 0) * one.deltas) / max(1, one.turns)
                table.add(name, transport, "CPU per delta, all-in", 1e6 * all_in, "us", CPU_PER_DELTA_US, vs_sse=True)
                table.add(name, transport, "CPU per turn (from 1-delta turns)", 1e3 * per_turn, "ms",
                          CPU_PER_TURN_MS, digits=2, vs_sse=True)
                table.add(name, transport, "CPU per delta, turn cost removed",
                          None if per_delta is None else 1e6 * per_delta, "us")
                table.add(name, transport, "share of CPU in turn overhead",
                          100 * per_turn * turns / run.service_cpu if run.service_cpu else None, "%", digits=0)
                add_latency(table, name, transport, run, LATENCY_P99_MS, detail=True)
                ttfd = run.ttfd_ms()
                table.add(name, transport, "time to first delta p50", pct(ttfd, 50), "ms", digits=2)
                table.add(name, transport, "time to first delta p99", pct(ttfd, 99), "ms", digits=2)
                table.add(name, transport, "time to first delta overhead p50", pct(run.ttfd_ms(overhead=True), 50),
                          "ms", TTFD_P50_MS, digits=2, vs_sse=True)
                add_common(table, name, transport, run)
                table.add(name, transport, "errors (1-delta turns)", one.errors, "", 0, digits=0)

        for transport in transports:
            if "C" in scenarios:
                progress(f"C {transport}: {c_streams} streams x {c_deltas} deltas at 10/s")
                ramp = ramp_for(c_deltas, 10.0)
                run = bench.load(service, transport, c_streams, c_deltas, 10.0, ramp=ramp)
                count_errors("C", transport, run)
                name = f"C {c_streams}x10/s sustained"
                add_latency(table, name, transport, run, SUSTAINED_P99_MS, detail=False)
                table.add(name, transport, "CPU per delta, all-in", 1e6 * run.service_cpu / max(1, run.deltas), "us")
                table.add(name, transport, "service CPU busy", 100 * run.service_cpu / run.wall, "% core", digits=0)
                add_pool(table, name, transport, run)
                add_common(table, name, transport, run)
        if set("ABC") & set(scenarios):
            retire(service)

        # G on a fresh service too: what the runs and connections ended before would change when
        # its full garbage collections come.
        if "G" in scenarios:
            for transport in transports:
                progress(f"G {transport}: {g_streams} streams x {g_deltas} deltas at 10/s, turn after turn for "
                         f"{g_seconds:g} s, a connection each")
                service = new_service()
                bench.load(service, transport, min(20, g_streams), 5, 0)  # warm-up: imports, pools
                # Clients start evenly over a turn's length, so that turns end and begin at a steady
                # pace, not in waves (a wave of 1,000 new turns saturates the core for its length).
                run = bench.load(service, transport, g_streams, g_deltas, 10.0,
                                 ramp=args.ramp if args.ramp is not None else g_deltas / 10.0, duration=g_seconds)
                count_errors("G", transport, run)
                name = f"G {g_streams}x10/s turnover"
                table.add(name, transport, "turns/s (a new connection each)", run.turns / run.wall, "/s", digits=0)
                add_latency(table, name, transport, run, SUSTAINED_P99_MS, detail=False, steady=False)
                table.add(name, transport, "CPU per delta, all-in", 1e6 * run.service_cpu / max(1, run.deltas), "us")
                # Over the whole run: its first and last turn's length hold half the streams on average.
                table.add(name, transport, "service CPU busy (whole run)", 100 * run.service_cpu / run.wall, "% core",
                          digits=0)
                add_pool(table, name, transport, run)
                add_common(table, name, transport, run)
                retire(service)

        # F: the floors. D's then B's load (SSE) against bench/floor.py's relays instead of the service.
        if "F" in scenarios:
            floors = [("raw", "floor: raw asyncio relay"), ("hypercorn", "floor: bare ASGI relay, hypercorn")]
            if args.conventional:  # not a floor: what the targets were set against
                floors.append(("conventional", "reference: FastAPI, sse-starlette, openai SDK, uvicorn"))
            for floor, label in floors:
                progress(f"F {label}: {d_streams} idle streams, then {b_streams} x {b_deltas} deltas at {b_rate:g}/s")
                relay = Service(bench.upstream, service_cpus, args.worker_class if floor == "hypercorn" else None,
                                floor=floor, conventional_python=args.conventional)
                services.append(relay)
                bench.load(relay, "sse", min(20, d_streams), 5, 0)  # warm-up, as in D
                idle = bench.load(relay, "sse", d_streams, 2, 0, stall=600, ramp=0.1 if quick else 2.0, hold=hold)
                run = bench.load(relay, "sse", b_streams, b_deltas, b_rate, ramp=ramp_for(b_deltas, b_rate))
                count_errors(f"F {floor}", "sse", idle, run)
                name = f"F {label}"
                table.add(name, "sse", "RSS per open idle stream (as D)",
                          (idle.rss_open_kib - idle.rss_before_kib) / d_streams, "KiB", IDLE_KIB_PER_STREAM)
                table.add(name, "sse", "errors (idle streams)", idle.errors, "", 0, digits=0)
                table.add(name, "sse", "CPU per delta, all-in", 1e6 * run.service_cpu / max(1, run.deltas), "us",
                          CPU_PER_DELTA_US)
                add_latency(table, name, "sse", run, LATENCY_P99_MS, detail=False)
                table.add(name, "sse", "time to first delta overhead p50", pct(run.ttfd_ms(overhead=True), 50),
                          "ms", TTFD_P50_MS, digits=2)
                add_common(table, name, "sse", run)
                retire(relay)
    except Exception as exc:
        print(table.render())
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        for service in services:
            print(f"service log: {service.log_path}", file=sys.stderr)
        return 1
    finally:
        for service in services:
            service.stop()
        if bench.upstream is not None:
            bench.upstream.stop()

    errors = sum(count for _, count, _ in error_reasons)
    print(table.render())
    print(f"\nerrors counted: {errors}; service log lines at WARNING or above: {bench.warnings}")
    for where, count, reason in error_reasons:
        print(f"  {where}: {count} x {reason}")
    if bench.warnings or errors:
        print("service logs: " + ", ".join(str(s.log_path) for s in services))
    else:
        for service in services:
            service.log_path.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in table.rows], indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
