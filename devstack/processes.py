"""gunicorn as a child process, and a bounded HTTP load generator, for tests and the bench."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


# What gevent's monitor thread prints when a greenlet held the event loop too long.
BLOCKED_MARK = "appears to be blocked"
# The loop may be held this long before the monitor reports it. Below about 100 ms, a loaded
# 2-core machine's scheduling noise (and the monitor's own reports) set it off.
MONITOR_BLOCKING_S = 0.1


class GunicornServer:
    """`gunicorn -c gunicorn.conf.py wsgi:app` (the image's CMD) with a log file of its own.

    ``monitor_blocking``: run gevent's monitor thread in every worker, which reports any
    greenlet that holds the event loop longer than MONITOR_BLOCKING_S (``blocking_reports``).
    ``prefix``: a command that sets something up and then execs the rest of its command
    line (gunicorn's), so the pid signalled is still gunicorn's master: e.g. ``unshare``
    into a mount namespace with a ``resolv.conf`` of the test's own.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        port: int,
        workers: int,
        logfile: Path,
        app: str = "wsgi:app",
        monitor_blocking: bool = False,
        prefix: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.prefix = list(prefix)
        self.port = port
        self.workers = workers
        self.logfile = logfile
        self.env = {
            **os.environ,
            **env,
            **(monitor_env() if monitor_blocking else {}),
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port} --workers {workers}",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0, ready: bool = True) -> None:
        """Start gunicorn; wait (bounded) until every worker logged worker_ready and /readyz is 200.

        ``ready=False`` waits for the workers only (a server started against a database
        that is meant not to answer).

        /readyz alone is not enough: the first worker can answer while the others still
        boot, and a worker that boots after a rotation never logs that rotation.
        """
        self._log = open(self.logfile, "ab")  # noqa: SIM115 - closed in stop()
        offset = self._log.tell()  # a restart appends to the same file: count only this run
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        self.process = subprocess.Popen(
            [*self.prefix, gunicorn, "-c", "gunicorn.conf.py", self.app],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}: see {self.logfile}")
            booted = self.logfile.read_bytes()[offset:].count(b"worker_ready") >= self.workers
            if booted and (not ready or http_status(f"{self.url}/readyz") == 200):
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready within {timeout_s} s: see {self.logfile}")

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM, wait for the graceful shutdown (SIGKILL past ``timeout_s``)."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def output(self) -> str:
        """Everything gunicorn and its workers wrote so far."""
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def blocking_reports(self) -> list[str]:
        """gevent's monitor reports so far (see ``blocking_reports``)."""
        return blocking_reports(self.output())

    def problems(self, limit: int = 20) -> list[str]:
        """The last ``limit`` log lines at error level or carrying a traceback, for failure messages."""
        marks = ('"level": "error"', '"level": "critical"', "Traceback", "[ERROR]", "Error")
        lines = [line for line in self.output().splitlines() if any(m in line for m in marks)]
        return lines[-limit:]


def monitor_env() -> dict[str, str]:
    """The environment that turns gevent's monitor thread on at MONITOR_BLOCKING_S."""
    return {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": str(MONITOR_BLOCKING_S)}


def blocking_reports(output: str) -> list[str]:
    """gevent's monitor reports in ``output``: each the blocked greenlet and its stack."""
    reports = []
    for block in output.split("=" * 80):
        if BLOCKED_MARK in block:
            head, _, _ = block.partition("Info:")
            reports.append(head.strip())
    return reports


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The status of GET ``url``, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - loopback only
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@dataclass
class Sample:
    """One request: when it started (monotonic s), how long it took, and what came back."""

    started: float
    duration_ms: float
    status: int | None
    error: str | None = None


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    created_ids: list[int] = field(default_factory=list)
    # Posts answered 503 and sent once more with the same Idempotency-Key (``keys``).
    retried: int = 0

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if s.status is None or not 200 <= s.status < 300]


class LoadGenerator:
    """N client threads, each posting and reading messages until stopped (or ``max_s``).

    With ``path`` set, every client only GETs that path instead (the bench's 50 ms route).
    Every message body is unique to its post (``tag``, client, number), so a message stored
    twice is a duplicate write. With ``retry_503``, a post answered 503 is sent once more, as
    clients and SDKs do (the 503 still counts as a failed request; the retry is a sample of
    its own); with ``keys`` too, every post carries an ``Idempotency-Key``, the same on its
    retry.
    """

    def __init__(
        self,
        base_url: str,
        channel_ids: list[int],
        clients: int,
        max_s: float = 300.0,
        path: str | None = None,
        keys: bool = False,
        retry_503: bool = False,
    ) -> None:
        self.base_url = base_url
        self.channel_ids = channel_ids
        self.clients = clients
        self.max_s = max_s
        self.path = path
        self.keys = keys
        self.retry_503 = retry_503
        self.tag = secrets.token_hex(4)
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.result

    def _client(self, n: int) -> None:
        import requests

        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        i = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            sample = self._next_request(session, n, i)
            with self._lock:
                self.result.samples.append(sample)
            i += 1
        session.close()

    def _next_request(self, session: Any, n: int, i: int) -> Sample:
        """Client ``n``'s request number ``i``: post, then read the channel's 20 newest."""
        channel = self.channel_ids[(n + i) % len(self.channel_ids)] if self.channel_ids else 0
        if self.path is not None:
            return self._call(session.get, self.path)[0]
        if i % 2 == 0:
            return self._post(session, channel, f"{self.tag} c{n} m{i}")[0]
        return self._call(session.get, f"/api/channels/{channel}/messages?limit=20")[0]

    def _post(self, session: Any, channel: int, text: str) -> tuple[Sample, int | None]:
        """Post a message; a 201's id is recorded as a write to read back. Returns (sample, id)."""
        path = f"/api/channels/{channel}/messages"
        headers = {"Idempotency-Key": text} if self.keys else {}
        sample, body = self._call(session.post, path, json={"body": text}, headers=headers)
        if self.retry_503 and sample.status == 503:
            with self._lock:
                self.result.samples.append(sample)
                self.result.retried += 1
            sample, body = self._call(session.post, path, json={"body": text}, headers=headers)
        created = int(body["id"]) if sample.status == 201 and body else None
        if created is not None:
            with self._lock:
                self.result.created_ids.append(created)
        return sample, created

    def _call(self, method: Callable[..., Any], path: str, **kwargs: Any) -> tuple[Sample, Any]:
        started = time.monotonic()
        try:
            response = method(self.base_url + path, timeout=30, **kwargs)
            body = (
                response.json()
                if response.headers.get("content-type", "").startswith("application/json")
                else None
            )
            status: int | None = response.status_code
            error = None if 200 <= response.status_code < 300 else str(body)[:200]
        except Exception as exc:  # a transport failure counts as a failed request
            body, status, error = None, None, type(exc).__name__
        return Sample(started, (time.monotonic() - started) * 1000, status, error), body
