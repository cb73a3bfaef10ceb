"""Structured logging: JSON lines in production, readable console output for make run.

structlog renders both our own events and the standard library's records (gunicorn,
SQLAlchemy), so every line has the same shape. Exceptions are rendered without local
variables: a local named ``password`` must never reach a log line.

gunicorn.conf.py loads this file on its own (not through the ``commng`` package, which
would load the app into the master): it must import nothing but the standard library
and structlog.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping, MutableMapping
from typing import Any

import click
import structlog

__all__ = [
    "ACCESS_EVENT",
    "EVENT_MESSAGES",
    "QUIET_LOGGERS",
    "access_logger_class",
    "configure",
    "formatter",
    "route_to_stdlib",
    "skip_unused_record_fields",
]

# The operator-facing sentence of each stable event (the wording runbooks and log
# searches already use), kept word for word as its message.
EVENT_MESSAGES = {
    "auto_refresh_started": "Auto-refresh started",
    "credentials_fetched": "Successfully fetched database credentials from Secrets Manager",
    "rotation_detected": "Database password rotation detected",
    "refresh_started": "Refreshing database connection with rotated credentials",
    "refresh_succeeded": "Database connection successfully refreshed with new credentials",
    "old_pool_closed": "Old database pool closed",
    "refresh_failed": "Failed to refresh database connection",
}


# Loggers held at WARNING whatever LOG_LEVEL says (configure() and gunicorn.conf.py's
# logconfig both apply them, so they hold from the master's first line on):
# - alembic announces each of its plugins at INFO whenever Flask-Migrate is imported,
#   i.e. at every worker boot; migrations themselves still log "Running upgrade".
# - at DEBUG botocore logs every Secrets Manager request with its headers (the AWS
#   session token) and every response body (GetSecretValue: the database password);
#   boto3 and urllib3 log the same traffic around it.
# - at DEBUG SQLAlchemy logs statements with their parameters and result rows.
QUIET_LOGGERS = {
    "alembic.runtime.plugins": "WARNING",
    "boto3": "WARNING",
    "botocore": "WARNING",
    "urllib3": "WARNING",
    "sqlalchemy.engine": "WARNING",
    "sqlalchemy.pool": "WARNING",
}


def _event_message(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    message = EVENT_MESSAGES.get(str(event_dict.get("event")))
    if message is not None:
        event_dict.setdefault("message", message)
    return event_dict


def _pid(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


# gunicorn's access log, as one structured event instead of an Apache-style line.
ACCESS_EVENT = "http_request"
ACCESS_LOGGER = "gunicorn.access"


def _access_fields(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """gunicorn's access record -> method, path, status, duration_ms, request_id.

    gunicorn passes its "atoms" (every request header, the environ) as the record's
    arguments: only the fields named here are kept, never a header such as
    Authorization, and never the query string. Other records' arguments are dropped.
    """
    atoms = event_dict.pop("positional_args", None)
    record = event_dict.get("_record")
    if getattr(record, "name", None) != ACCESS_LOGGER or not isinstance(atoms, Mapping):
        return event_dict
    return _put_access_fields(event_dict, atoms)


def _put_access_fields(
    event_dict: MutableMapping[str, Any], atoms: Mapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["event"] = ACCESS_EVENT
    event_dict["method"] = atoms.get("m")
    event_dict["path"] = atoms.get("U")
    status = str(atoms.get("s", ""))
    event_dict["status"] = int(status) if status.isdigit() else status
    micros = atoms.get("D")
    event_dict["duration_ms"] = round(micros / 1000, 1) if isinstance(micros, int) else None
    event_dict["request_id"] = atoms.get("{x-request-id}o")
    event_dict["remote_addr"] = atoms.get("h")
    return event_dict


def _response_header(headers: Any, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return str(value)
    return None


def access_logger_class() -> type:
    """gunicorn's Logger, handing the access record only the atoms ``_access_fields`` keeps.

    gunicorn's own ``access()`` builds every atom first (each request and response
    header, the whole environ, a strftime timestamp) and wraps them in a case-folding
    mapping: most of the line's cost, for fields the line then drops. The record, its
    level and its logger are the same, so the line is too (tests/test_logging.py).
    """
    from gunicorn import glogging

    class AccessLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn is untyped: Any
        def access(self, resp: Any, req: Any, environ: Mapping[str, Any], request_time: Any) -> None:
            if not self.access_log_enabled:
                return
            status = resp.status
            atoms = {
                "m": environ.get("REQUEST_METHOD"),
                "U": environ.get("PATH_INFO"),
                "s": status.split(None, 1)[0] if isinstance(status, str) else status,
                "D": request_time.seconds * 1_000_000 + request_time.microseconds,
                "{x-request-id}o": _response_header(resp.headers, "x-request-id"),
                "h": environ.get("REMOTE_ADDR", "-"),
            }
            try:
                self.access_log.info(ACCESS_EVENT, atoms)
            except Exception:
                self.error(traceback.format_exc())

    return AccessLogger


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _event_message,
        _pid,
    ]


class _Formatter(structlog.stdlib.ProcessorFormatter):
    """ProcessorFormatter; in JSON, gunicorn's access record skips the chain for the same line.

    The access line is the one written per request. Through the chain it costs a copy of
    the record and a dozen processor calls; here it is the same dict built directly
    (event, contextvars, logger, level, timestamp, pid and the access fields, in the
    chain's order) and rendered by the same JSONRenderer. tests/test_logging.py checks
    that both paths give the same line.
    """

    def __init__(self, *args: Any, fast_access: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_access = fast_access
        self._stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        self._render = structlog.processors.JSONRenderer()

    def format(self, record: logging.LogRecord) -> str:
        if (
            self._fast_access
            and record.name == ACCESS_LOGGER
            and isinstance(record.args, Mapping)
            and record.exc_info is None
            and record.msg == ACCESS_EVENT
        ):
            event_dict: dict[str, Any] = {"event": ACCESS_EVENT}
            for key, value in structlog.contextvars.get_contextvars().items():
                event_dict.setdefault(key, value)  # what merge_contextvars does
            event_dict["logger"] = record.name
            event_dict["level"] = record.levelname.lower()
            self._stamp(None, "", event_dict)
            event_dict.setdefault("pid", os.getpid())
            return str(self._render(None, "", _put_access_fields(event_dict, record.args)))
        return str(super().format(record))


def formatter(log_format: str) -> structlog.stdlib.ProcessorFormatter:
    """The logging.Formatter used for every handler (also by gunicorn's logconfig)."""
    if log_format == "console":
        # plain_traceback named explicitly: ConsoleRenderer's default becomes rich's
        # traceback (local variables shown) or better_exceptions (values shown) as soon
        # as either package is installed.
        renderer: Any = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        exceptions: list[Any] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        exceptions = [structlog.processors.ExceptionRenderer(transformer)]
    return _Formatter(
        foreign_pre_chain=[*_shared_processors(), _access_fields],
        # The record's arguments reach _access_fields, which keeps what it names only.
        pass_foreign_args=True,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exceptions,
            renderer,
        ],
        fast_access=log_format != "console",
    )


def route_to_stdlib() -> None:
    """Send structlog events through the standard library (handlers, pytest's caplog)."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that flushes under the lock ``handle()`` holds instead of taking it again.

    The stock ``emit`` calls ``self.flush()``, which acquires the handler's lock a second
    time: under gevent that lock is a pure-Python RLock, and the access line pays for it
    on every request. Same write, same flush, same error handling.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def skip_unused_record_fields() -> None:
    """No log record collects its caller, thread or process: no line shows them.

    The standard library's documented switches (the logging HOWTO's "Optimization"
    table). Without them every record, one per request for the access line, walks the
    stack to find its caller (normalising each frame's file name), looks up the current
    thread (a greenlet lookup under gevent) and asks the OS for the process id. Our
    lines carry ``pid`` from the ``_pid`` processor instead.
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def configure(level: str = "INFO", log_format: str = "json") -> None:
    """Route structlog and the standard library through one handler: stdout, or stderr under a CLI.

    ``flask --app wsgi rotation ...`` creates the app inside click's context: there the
    logs go to stderr, so that stdout carries only what the command prints.
    """
    route_to_stdlib()
    skip_unused_record_fields()
    under_cli = click.get_current_context(silent=True) is not None
    handler = _LineHandler(sys.stderr if under_cli else sys.stdout)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
