"""Tests of the settings: every bad value stops start-up with one clear line naming the variable."""

from __future__ import annotations

import atexit
import os
import runpy
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.config import DEFAULT_MODEL, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-key-0123456789"


def load(**env: str) -> Settings:
    return load_settings({"OPENAI_API_KEY": KEY, **env})


# (variable, attribute, whole number?, minimum, default)
NUMERIC = [
    ("TOOL_TIMEOUT_SECONDS", "tool_timeout_seconds", False, 0.001, 30.0),
    ("MAX_TOOL_ROUNDS", "max_tool_rounds", True, 1, 10),
    ("SSE_HEARTBEAT_SECONDS", "sse_heartbeat_seconds", False, 0.01, 15.0),
    ("SSE_RETRY_MS", "sse_retry_ms", True, 0, 5000),
    ("WS_PING_SECONDS", "ws_ping_seconds", False, 0, 20.0),
    ("UPSTREAM_MAX_RETRIES", "upstream_max_retries", True, 0, 3),
    ("UPSTREAM_CONNECT_TIMEOUT_SECONDS", "upstream_connect_timeout_seconds", False, 0.01, 10.0),
    ("UPSTREAM_IDLE_TIMEOUT_SECONDS", "upstream_idle_timeout_seconds", False, 0.01, 120.0),
    ("THREAD_LOCK_TIMEOUT_SECONDS", "thread_lock_timeout_seconds", False, 0, 30.0),
    ("MAX_MESSAGE_CHARS", "max_message_chars", True, 1, 32_000),
    ("MAX_BODY_BYTES", "max_body_bytes", True, 64, 262_144),
    ("SLOW_CLIENT_TIMEOUT_SECONDS", "slow_client_timeout_seconds", False, 0.01, 30.0),
    ("SHUTDOWN_GRACE_SECONDS", "shutdown_grace_seconds", False, 0, 2.0),
    ("STREAM_RETENTION_SECONDS", "stream_retention_seconds", False, 0, 300.0),
]
NUMERIC_IDS = [row[0] for row in NUMERIC]


# --------------------------------------------------------------------------------------------
# defaults


def test_defaults() -> None:
    settings = load_settings({"OPENAI_API_KEY": KEY})
    assert settings.openai_api_key == KEY
    assert settings.openai_base_url is None
    assert settings.openai_model == DEFAULT_MODEL == "gpt-4.1-mini"
    assert settings.engine == "responses"
    assert settings.assistant_id is None
    assert settings.instructions is None
    assert settings.initial_message is None
    assert settings.tools_module is None
    assert settings.log_level == "INFO"
    assert settings.service_api_key is None
    assert settings.cors_allow_origins == ()
    for _, attribute, integer, _, default in NUMERIC:
        value = getattr(settings, attribute)
        assert value == default, attribute
        assert type(value) is (int if integer else float), attribute


def test_blank_values_count_as_unset() -> None:
    blank = {name: "   " for name, *_ in NUMERIC}
    blank |= {"OPENAI_MODEL": "", "LOG_LEVEL": " ", "ASSISTANT_ENGINE": "", "OPENAI_BASE_URL": "  "}
    assert load_settings({"OPENAI_API_KEY": KEY, **blank}) == load_settings({"OPENAI_API_KEY": KEY})


def test_text_settings_are_read_and_stripped() -> None:
    settings = load(
        OPENAI_MODEL=" gpt-5 ",
        ASSISTANT_INSTRUCTIONS="Be brief.",
        ASSISTANT_INITIAL_MESSAGE="Hi!",
        ASSISTANT_TOOLS="my.tools",
        SERVICE_API_KEY="svc-key",
    )
    assert settings.openai_model == "gpt-5"
    assert settings.instructions == "Be brief."
    assert settings.initial_message == "Hi!"
    assert settings.tools_module == "my.tools"
    assert settings.service_api_key == "svc-key"


def test_default_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-os-environ")
    monkeypatch.setenv("MAX_TOOL_ROUNDS", "4")
    settings = load_settings()
    assert settings.openai_api_key == "sk-from-os-environ"
    assert settings.max_tool_rounds == 4


# --------------------------------------------------------------------------------------------
# numbers


BAD_NUMBERS = ["abc", "12abc", "1,5", "0x10", "-1", "-5.5", "nan", "NaN", "-nan", "inf", "Infinity", "-inf", "1e999"]


@pytest.mark.parametrize(("name", "attribute", "integer", "minimum", "default"), NUMERIC, ids=NUMERIC_IDS)
def test_numeric_rejects_bad_values(name: str, attribute: str, integer: bool, minimum: float, default: float) -> None:
    for raw in BAD_NUMBERS:
        with pytest.raises(ConfigError) as info:
            load(**{name: raw})
        message = str(info.value)
        assert message.startswith(f"{name} must be "), (raw, message)
        assert repr(raw) in message, (raw, message)


@pytest.mark.parametrize(("name", "attribute", "integer", "minimum", "default"), NUMERIC, ids=NUMERIC_IDS)
def test_numeric_rejects_values_below_minimum(
    name: str, attribute: str, integer: bool, minimum: float, default: float
) -> None:
    below = str(minimum - 1) if integer else str(minimum / 2 if minimum else -0.001)
    with pytest.raises(ConfigError, match=rf"^{name} must be at least"):
        load(**{name: below})


@pytest.mark.parametrize(("name", "attribute", "integer", "minimum", "default"), NUMERIC, ids=NUMERIC_IDS)
def test_numeric_accepts_minimum_and_larger(
    name: str, attribute: str, integer: bool, minimum: float, default: float
) -> None:
    assert getattr(load(**{name: str(minimum)}), attribute) == minimum
    settings = load(**{name: " 77 "})
    value = getattr(settings, attribute)
    assert value == 77 and type(value) is (int if integer else float)


@pytest.mark.parametrize(("name", "attribute", "integer", "minimum", "default"), NUMERIC, ids=NUMERIC_IDS)
def test_numeric_fractions(name: str, attribute: str, integer: bool, minimum: float, default: float) -> None:
    if integer:
        with pytest.raises(ConfigError, match=rf"^{name} must be a whole number, got '2\.5'"):
            load(**{name: "2.5"})
    else:
        assert getattr(load(**{name: "2.5"}), attribute) == 2.5
        assert getattr(load(**{name: "1e2"}), attribute) == 100.0


@pytest.mark.parametrize("raw", ["0.5", "0.001", "1e-300"])
def test_ws_ping_seconds_is_0_or_at_least_1(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^WS_PING_SECONDS must be 0 \(no pings\) or at least 1, got "):
        load(WS_PING_SECONDS=raw)
    assert load(WS_PING_SECONDS="0").ws_ping_seconds == 0.0


@pytest.mark.parametrize("raw", ["inf", "Infinity", "1e999", "nan"])
def test_numbers_must_be_finite(raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"^SSE_HEARTBEAT_SECONDS must be a finite number, got '{raw}'$"):
        load(SSE_HEARTBEAT_SECONDS=raw)


# --------------------------------------------------------------------------------------------
# the other checks


@pytest.mark.parametrize("env", [{}, {"OPENAI_API_KEY": ""}, {"OPENAI_API_KEY": "   "}, {"OPENAI_MODEL": "x"}])
def test_api_key_required(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"^OPENAI_API_KEY is required"):
        load_settings(env)


def test_api_key_is_stripped() -> None:
    assert load_settings({"OPENAI_API_KEY": "  sk-abc \n"}).openai_api_key == "sk-abc"


@pytest.mark.parametrize("url", ["http://localhost:8080/v1", "https://api.openai.com/v1", "https://x.example/"])
def test_base_url_accepted(url: str) -> None:
    assert load(OPENAI_BASE_URL=url).openai_base_url == url


@pytest.mark.parametrize(
    "url", ["api.openai.com/v1", "ftp://api.openai.com", "file:///etc/passwd", "ws://x", "//api.openai.com", "http:/x",
            "http://", "https:///v1", "http://[::1", "http://localhost:notaport/v1"]
)
def test_base_url_rejected(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(OPENAI_BASE_URL=url)
    assert str(info.value) == f"OPENAI_BASE_URL must be an http:// or https:// URL with a host, got {url!r}"


@pytest.mark.parametrize(("raw", "expected"), [(None, "auto"), ("auto", "auto"), (" Disabled ", "disabled")])
def test_truncation(raw: str | None, expected: str) -> None:
    assert (load() if raw is None else load(OPENAI_TRUNCATION=raw)).truncation == expected


def test_truncation_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^OPENAI_TRUNCATION must be one of auto, disabled, got 'last_messages'$"):
        load(OPENAI_TRUNCATION="last_messages")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("debug", "DEBUG"), ("Info", "INFO"), ("WARNING", "WARNING"), ("error", "ERROR"), (" critical ", "CRITICAL")],
)
def test_log_level_case_insensitive(raw: str, expected: str) -> None:
    assert load(LOG_LEVEL=raw).log_level == expected


@pytest.mark.parametrize("raw", ["verbose", "WARN", "trace", "10", "info,debug"])
def test_log_level_rejected(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        load(LOG_LEVEL=raw)


@pytest.mark.parametrize("raw", ["chat", "completions", "response", "assistant"])
def test_unknown_engine_rejected(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^ASSISTANT_ENGINE must be one of responses, assistants"):
        load(ASSISTANT_ENGINE=raw)


@pytest.mark.parametrize("raw", ["assistants", "Assistants", " ASSISTANTS "])
def test_assistants_engine_needs_assistant_id(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^ASSISTANT_ENGINE=assistants needs OPENAI_ASSISTANT_ID"):
        load(ASSISTANT_ENGINE=raw)
    with pytest.raises(ConfigError, match=r"OPENAI_ASSISTANT_ID"):
        load(ASSISTANT_ENGINE=raw, OPENAI_ASSISTANT_ID="  ")
    settings = load(ASSISTANT_ENGINE=raw, OPENAI_ASSISTANT_ID="asst_123")
    assert settings.engine == "assistants" and settings.assistant_id == "asst_123"


def test_responses_engine_keeps_an_assistant_id_it_does_not_need() -> None:
    settings = load(ASSISTANT_ENGINE="RESPONSES", OPENAI_ASSISTANT_ID="asst_1")
    assert settings.engine == "responses" and settings.assistant_id == "asst_1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ()),
        ("*", ("*",)),
        ("https://a.example", ("https://a.example",)),
        ("https://a.example,https://b.example", ("https://a.example", "https://b.example")),
        (" https://a.example , ,https://b.example,, ", ("https://a.example", "https://b.example")),
        (",,,", ()),
    ],
)
def test_cors_origins(raw: str, expected: tuple[str, ...]) -> None:
    assert load(CORS_ALLOW_ORIGINS=raw).cors_allow_origins == expected


def test_cors_origins_with_ports_and_ipv6_hosts() -> None:
    assert load(CORS_ALLOW_ORIGINS="http://localhost:8080,https://[::1]:8443").cors_allow_origins == (
        "http://localhost:8080", "https://[::1]:8443")


@pytest.mark.parametrize("origin", ["example.com", "app.example.com:443", "ftp://a.example", "https://a.example/app",
                                    "https://", "https://a.example/", "https://a.example?x=1", "https://a.example#f",
                                    "https://user@a.example", "https://App.Example.com", "http://[::1",
                                    "https://a.example:99999"])
def test_cors_origins_that_no_browser_sends_are_rejected(origin: str) -> None:
    """A browser's Origin is scheme://host[:port]: anything else could never match."""
    with pytest.raises(ConfigError, match=r"^CORS_ALLOW_ORIGINS takes origins like https://app.example.com or \*"):
        load(CORS_ALLOW_ORIGINS=f"https://ok.example,{origin}")


def test_secrets_never_in_repr() -> None:
    settings = load_settings(
        {"OPENAI_API_KEY": "sk-secret-openai-123", "SERVICE_API_KEY": "svc-secret-456", "OPENAI_MODEL": "gpt-x"}
    )
    for text in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert "sk-secret-openai-123" not in text
        assert "svc-secret-456" not in text
        assert "gpt-x" in text  # the repr is real, not blanked out
    assert settings.openai_api_key == "sk-secret-openai-123"


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(AttributeError):
        settings.openai_model = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# start-up: `import app` stops with one line and exit code 2


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "import app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_both() -> dict[str, subprocess.Popen[str]]:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ASSISTANT_TOOLS")}
    return {
        "no_key": _start(base),
        "bad_tools": _start({**base, "OPENAI_API_KEY": "sk-test", "ASSISTANT_TOOLS": "no_such_module"}),
    }


def _reap(procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Importing the app takes most of a second; both processes start when this module is collected,
# so they run while the other tests do, and the suite stays fast.
_EARLY = _start_both()
atexit.register(_reap, _EARLY)


@pytest.fixture(scope="module")
def startups() -> Iterator[dict[str, tuple[int, str, str]]]:
    results = {}
    try:
        for label, proc in _EARLY.items():
            stdout, stderr = proc.communicate(timeout=30)
            results[label] = (proc.returncode, stdout, stderr)
        yield results
    finally:
        _reap(_EARLY)


def test_import_app_without_api_key_exits_2(startups: dict[str, tuple[int, str, str]]) -> None:
    code, stdout, stderr = startups["no_key"]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("configuration error: OPENAI_API_KEY is required ")
    assert stdout == ""


def test_import_app_with_missing_tool_module_exits_2(startups: dict[str, tuple[int, str, str]]) -> None:
    code, stdout, stderr = startups["bad_tools"]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("configuration error: cannot import tool module 'no_such_module'")
    assert "No module named 'no_such_module'" in lines[0]
    assert stdout == ""


def test_start_script_runs_the_procfiles_command() -> None:
    """`scripts/start.sh` (the README's run command) starts hypercorn with the Procfile's
    arguments, so what a newcomer runs is what is deployed."""
    procfile = (REPO / "Procfile").read_text().split("web:", 1)[1].strip()
    start = (REPO / "scripts" / "start.sh").read_text().splitlines()[-1]
    assert start.startswith("exec .venv/bin/"), start
    assert start.removeprefix("exec .venv/bin/").replace('"0.0.0.0:${PORT}"', "0.0.0.0:$PORT") == procfile


@pytest.mark.parametrize(("raw", "interval"), [(None, 20.0), ("5", 5.0), ("1", 1.0), ("0", None), ("abc", 20.0),
                                               ("0.5", None), ("inf", None)])
def test_hypercorn_pings_websockets_every_ws_ping_seconds(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, interval: float | None
) -> None:
    """hypercorn_config.py passes WS_PING_SECONDS on (0: no pings; a bad value, "abc" or 0.5, is
    the app's to refuse)."""
    if raw is None:
        monkeypatch.delenv("WS_PING_SECONDS", raising=False)
    else:
        monkeypatch.setenv("WS_PING_SECONDS", raw)
    config = run_hypercorn_config(monkeypatch)
    assert config["websocket_ping_interval"] == interval


def run_hypercorn_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """hypercorn_config.py's settings, as hypercorn reads them (its excepthook put back afterwards)."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    return runpy.run_path(str(REPO / "hypercorn_config.py"))


@pytest.mark.parametrize(("raw", "on"), [(None, False), ("off", False), ("on", True), (" ON ", True)])
def test_ws_compression(raw: str | None, on: bool) -> None:
    assert load(**({} if raw is None else {"WS_COMPRESSION": raw})).ws_compression is on


@pytest.mark.parametrize("raw", ["yes", "true", "deflate"])
def test_ws_compression_is_on_or_off(raw: str) -> None:
    with pytest.raises(ConfigError, match=rf"^WS_COMPRESSION must be on or off, got '{raw}'$"):
        load(WS_COMPRESSION=raw)


def test_a_port_already_in_use_stops_the_service_with_one_line_and_exit_code_2() -> None:
    """hypercorn binds before it imports the app: without hypercorn_config.py's hook, this was
    hypercorn's traceback (and the same exit status as a crash)."""
    from tests.e2e import clean_environment, procfile_hypercorn_args

    with socket.socket() as held, socket.socket() as free:
        held.bind(("127.0.0.1", 0))
        held.listen()
        free.bind(("127.0.0.1", 0))
        bind = f"127.0.0.1:{held.getsockname()[1]}"
        free_bind = f"127.0.0.1:{free.getsockname()[1]}"
        free.close()  # free again: only the second address fails, and the line names that one
        done = subprocess.run(
            [sys.executable, "-m", "hypercorn", "app:app", "--bind", free_bind, f"--bind={bind}",
             *procfile_hypercorn_args()],
            cwd=REPO, env=clean_environment(OPENAI_API_KEY="sk-test"), capture_output=True, text=True, timeout=30,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"configuration error: cannot listen on {bind}: Address already in use "
        "(another server holds it: stop that one or set PORT)"
    ], done.stderr
    assert done.stdout == ""


def test_start_script_without_a_key_says_so_in_one_line_and_exit_code_2() -> None:
    """As the service says a bad setting, and before it spends time installing anything."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(["bash", str(REPO / "scripts" / "start.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["configuration error: OPENAI_API_KEY is required (or run against the fake: see README)"]
