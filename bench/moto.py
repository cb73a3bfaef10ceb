"""An in-process moto Secrets Manager that counts, by API, the calls the app makes.

In-process rather than the ``moto_server`` executable, for two reasons:

- moto keeps its state in module globals, so this server can be stopped and started
  again on the same port with the same secrets and version ids (``secrets-outage``
  needs "restarted with the same state"; a new ``moto_server`` process starts empty);
- a WSGI middleware sees the ``X-Amz-Target`` header of every call
  (``secretsmanager.DescribeSecret``...), which moto's access log does not show.

Calls the bench itself makes carry ``BENCH_AGENT`` in their User-Agent and are not counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from devstack.secrets import secrets_client

__all__ = ["BENCH_AGENT", "CountingMotoServer", "bench_client"]

BENCH_AGENT = "commng-bench"


class _OneShotHandler(MotoRequestHandler):
    # HTTP/1.0: each connection closes after one answer, so a stopped server leaves no
    # keep-alive connection answering behind its back; the app sees connection refused.
    protocol_version = "HTTP/1.0"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log line per call: the counter is the record."""


class CountingMotoServer:
    """moto on 127.0.0.1:``port``; ``stop()`` and ``start()`` keep the secrets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on the same port; moto's backends still hold the old state."""
        if self._server is not None:
            return
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", self.port, self._counting(app), threaded=True, request_handler=_OneShotHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-moto", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the socket: new connections are refused."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def take_calls(self) -> dict[str, int]:
        """The app's calls by API since the last take, and reset the counter."""
        with self._lock:
            calls = dict(self._calls)
            self._calls.clear()
        return calls

    def _counting(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
            if target and BENCH_AGENT not in str(environ.get("HTTP_USER_AGENT", "")):
                with self._lock:
                    self._calls[target.rsplit(".", 1)[-1]] += 1
            return app(environ, start_response)

        return counted


def bench_client(endpoint: str) -> Any:
    """The bench's own boto3 client; its calls are marked and not counted as the app's."""
    from botocore.config import Config

    return secrets_client(endpoint, Config(user_agent_extra=BENCH_AGENT))
