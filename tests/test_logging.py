"""Structured logs: JSON shape, no locals in tracebacks, gunicorn's access record, request ids."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from gunicorn import glogging
from gunicorn.config import Config

from commng.observability import logs, request_context
from commng.observability.request_context import REQUEST_ID_HEADER, request_id_from
from config import Settings
from tests.helpers import assert_no_secrets

ROOT = Path(__file__).resolve().parent.parent
SECRET = "pa55#?%&=+:;word"


@pytest.fixture
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A stdlib logger whose records go through the JSON formatter into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.formatter("json"))
    logger = logging.getLogger("commng.tests.logging")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, buffer
    finally:
        logger.handlers = []
        logger.propagate = True


def _records(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _fail_with_a_password_local() -> None:
    password = SECRET
    raise RuntimeError(f"connection refused ({len(password)} characters tried)")


def test_exceptions_are_rendered_without_local_variables(
    json_lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = json_lines
    logs.route_to_stdlib()
    try:
        _fail_with_a_password_local()
    except RuntimeError:
        logger.exception("stdlib_failure")
        structlog.get_logger("commng.tests.logging").exception("structlog_failure", error="RuntimeError")

    records = _records(buffer)
    assert [r["event"] for r in records] == ["stdlib_failure", "structlog_failure"]
    for record in records:
        assert {"event", "level", "timestamp", "exception"} <= set(record)
        frames = record["exception"][0]["frames"]
        assert any(f["name"] == "_fail_with_a_password_local" for f in frames)
        assert all(not f.get("locals") for f in frames)
    assert_no_secrets(buffer.getvalue(), [SECRET])


def test_console_tracebacks_show_no_local_variables() -> None:
    formatter = logs.formatter("console")
    renderer = formatter.processors[-1]
    assert isinstance(renderer, structlog.dev.ConsoleRenderer)
    # Not left to the default, which becomes rich's traceback (locals shown) as soon as
    # rich is installed, or better_exceptions (values shown).
    assert renderer.exception_formatter is structlog.dev.plain_traceback
    try:
        _fail_with_a_password_local()
    except RuntimeError:
        record = logging.LogRecord(
            "commng.tests.logging", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = formatter.format(record)
    assert "_fail_with_a_password_local" in text
    assert "RuntimeError: connection refused" in text
    assert_no_secrets(text, [SECRET])


QUIET = ["boto3", "botocore", "urllib3", "sqlalchemy.engine", "sqlalchemy.pool"]
# Where the secrets would be logged from: their levels are inherited from QUIET.
CHILDREN = ["botocore.endpoint", "botocore.parsers", "botocore.auth", "urllib3.connectionpool"]
CHILDREN += ["sqlalchemy.engine.Engine", "sqlalchemy.pool.impl.QueuePool"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() replaces the root handler and sets levels: put them back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in [*QUIET, *CHILDREN]}
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_libraries_that_log_secrets_at_debug_stay_at_warning(log_format: str) -> None:
    logs.configure("DEBUG", log_format)
    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("commng_rotation").isEnabledFor(logging.DEBUG)
    for name in [*QUIET, *CHILDREN]:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name


def test_stable_events_carry_their_sentences(
    json_lines: tuple[logging.Logger, io.StringIO],
) -> None:
    _logger, buffer = json_lines
    logs.route_to_stdlib()
    structlog.get_logger("commng.tests.logging").info("refresh_succeeded", swap_ms=12.5)
    (record,) = _records(buffer)
    assert record["event"] == "refresh_succeeded"
    assert record["message"] == "Database connection successfully refreshed with new credentials"
    assert record["level"] == "info"
    assert record["pid"] == os.getpid()


def _access_record(
    headers: list[tuple[str, str]],
    response_headers: list[tuple[str, str]],
    logger_class: type = glogging.Logger,
) -> logging.LogRecord:
    """The record ``logger_class.access()`` hands to the gunicorn.access logger."""
    cfg = Config()
    cfg.set("accesslog", "-")
    gunicorn_log = logger_class(cfg)
    environ = {
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/api/channels/7/messages?token=" + SECRET,
        "PATH_INFO": "/api/channels/7/messages",
        "QUERY_STRING": "token=" + SECRET,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.0.0.9",
        **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers},
    }
    response = SimpleNamespace(status="201 CREATED", headers=response_headers, sent=42)
    request = SimpleNamespace(headers=headers)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    access_log = logging.getLogger("gunicorn.access")
    access_log.addHandler(handler)
    try:
        gunicorn_log.access(response, request, environ, timedelta(milliseconds=12, microseconds=345))
    finally:
        access_log.removeHandler(handler)
    (record,) = records
    return record


def test_gunicorn_access_record_becomes_a_structured_event() -> None:
    record = _access_record(
        [("Authorization", f"Bearer {SECRET}"), ("X-Request-ID", "from-client")],
        [("Content-Type", "application/json"), ("X-Request-ID", "from-client")],
    )
    line = logs.formatter("json").format(record)
    event = json.loads(line)
    assert event["event"] == logs.ACCESS_EVENT
    assert {k: event[k] for k in ("method", "path", "status", "duration_ms", "request_id")} == {
        "method": "POST",
        "path": "/api/channels/7/messages",
        "status": 201,
        "duration_ms": 12.3,
        "request_id": "from-client",
    }
    assert {"level", "timestamp", "logger"} <= set(event)
    assert "positional_args" not in event
    assert_no_secrets(line, [SECRET])


def test_the_slim_access_logger_writes_the_same_line_as_gunicorns() -> None:
    """gunicorn.conf.py's logger_class builds only the atoms the line keeps: same line, less work.

    The stock record goes through the structlog chain, the slim one through the
    formatter's direct path: the lines must not differ but for the time.
    """
    headers = [("Authorization", f"Bearer {SECRET}"), ("X-Request-ID", "from-client")]
    response_headers = [("Content-Type", "application/json"), ("x-request-id", "from-client")]
    with structlog.contextvars.bound_contextvars(worker_note="bound"):
        stock = json.loads(logs.formatter("json").format(_access_record(headers, response_headers)))
        slim_record = _access_record(headers, response_headers, logs.access_logger_class())
        slim_line = logs.formatter("json").format(slim_record)
    assert list(json.loads(slim_line)) == list(stock)  # the same keys in the same order
    assert stock["worker_note"] == "bound"
    slim = json.loads(slim_line)
    del stock["timestamp"], slim["timestamp"]
    assert slim == stock
    assert slim["request_id"] == "from-client"
    assert_no_secrets(slim_line + repr(slim_record.args), [SECRET])
    no_id = json.loads(logs.formatter("json").format(_access_record(headers, [], logs.access_logger_class())))
    assert no_id["request_id"] is None


def test_other_records_keep_their_message_and_drop_their_arguments() -> None:
    record = logging.LogRecord("sqlalchemy.engine", logging.INFO, __file__, 1, "hello %s", (SECRET,), None)
    event = json.loads(logs.formatter("json").format(record))
    assert event["event"] == f"hello {SECRET}"  # the message is the library's own text
    assert "positional_args" not in event


def test_request_id_comes_from_the_header_then_the_alb_then_is_generated() -> None:
    trace = "Root=1-67891233-abcdef012345678912345678;Parent=463ac35c9f6413ad;Sampled=1"
    assert request_id_from({"X-Request-ID": "abc-123", "X-Amzn-Trace-Id": trace}) == "abc-123"
    assert request_id_from({"X-Amzn-Trace-Id": trace}) == "1-67891233-abcdef012345678912345678"
    assert request_id_from({"X-Amzn-Trace-Id": "Self=1-2-3;Root=1-aa-bb"}) == "1-aa-bb"
    assert request_id_from({"X-Request-ID": "x" * 129}, new="fresh") == "fresh"
    assert request_id_from({"X-Request-ID": 'a"b\nc'}, new="fresh") == "fresh"
    generated = request_id_from({})
    assert len(generated) == 32
    assert uuid.UUID(hex=generated).version == 4
    assert uuid.UUID(hex=generated).variant == uuid.RFC_4122
    assert request_id_from({}) != generated


def test_request_id_is_echoed_and_bound_to_the_requests_log_lines(make_app: Any, caplog: Any) -> None:
    # Nothing listens on port 1. No outage wait: the 503 comes at once, not after 10 s of retries.
    settings = Settings(
        postgres_host="127.0.0.1",
        postgres_port=1,
        postgres_user="x",
        postgres_password="y",
        db_outage_wait_ms=0,
    )
    client = make_app(settings).test_client()
    caplog.set_level(logging.INFO)

    response = client.get("/api/channels", headers={REQUEST_ID_HEADER: "req-42"})

    assert response.status_code == 503
    assert response.headers[REQUEST_ID_HEADER] == "req-42"
    lines = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    assert any(line["event"] == "database_unavailable" and line["request_id"] == "req-42" for line in lines)
    assert "request_id" not in structlog.contextvars.get_contextvars()
    generated = client.get("/healthz").headers[REQUEST_ID_HEADER]
    assert generated
    assert generated != "req-42"


def test_the_request_id_is_bound_before_every_other_request_hook(make_app: Any) -> None:
    settings = Settings(postgres_host="127.0.0.1", postgres_port=1, postgres_user="x", postgres_password="y")
    app = make_app(settings)
    # Registration order is the order Flask runs them: the factory registers the id first.
    assert app.before_request_funcs[None][0] is request_context._bind


def _gunicorn_conf(log_format: str, log_level: str = "INFO") -> subprocess.CompletedProcess[str]:
    script = (
        "import logging, logging.config, runpy, sys\n"
        "ns = runpy.run_path('gunicorn.conf.py')\n"
        "logging.config.dictConfig(ns['logconfig_dict'])\n"
        "logging.getLogger('gunicorn.error').info('Booting worker with pid: %s', 1)\n"
        "loaded = [m for m in ('commng', 'flask', 'sqlalchemy', 'boto3', 'botocore') if m in sys.modules]\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
        f"levels = {{n: logging.getLogger(n).getEffectiveLevel() for n in {[*QUIET, *CHILDREN]!r}}}\n"
        "print('LEVELS', levels, logging.getLogger('gunicorn.error').getEffectiveLevel(), file=sys.stderr)\n"
    )
    env = {**os.environ, "LOG_FORMAT": log_format, "LOG_LEVEL": log_level}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_gunicorn_logs_through_the_same_formatter_without_loading_the_app() -> None:
    result = _gunicorn_conf("json")
    assert "LOADED []" in result.stderr
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["event"] == "Booting worker with pid: 1"
    assert record["logger"] == "gunicorn.error"
    assert {"level", "timestamp"} <= set(record)

    console = _gunicorn_conf("console").stdout
    assert "Booting worker with pid: 1" in console
    assert not console.startswith("{")


def test_gunicorn_keeps_the_libraries_that_log_secrets_at_warning_under_debug() -> None:
    stderr = _gunicorn_conf("json", log_level="DEBUG").stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("LEVELS ")]
    levels, gunicorn_level = line.removeprefix("LEVELS ").rsplit(" ", 1)
    assert int(gunicorn_level) == logging.DEBUG  # LOG_LEVEL=DEBUG took effect
    assert ast.literal_eval(levels) == dict.fromkeys([*QUIET, *CHILDREN], logging.WARNING)
