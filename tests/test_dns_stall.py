"""A real resolver that stalls for 8 s: gunicorn's gevent worker keeps serving meanwhile.

The database's host is a name only a DNS server of this test knows (dnslib, on
127.0.0.77:53). gunicorn runs in a mount namespace of its own (``unshare --mount``) where
``/etc/resolv.conf`` names only that server, with a libc timeout longer than the stall (so
libc itself waits it out, as it would for a slow VPC resolver), and ``/etc/nsswitch.conf``
says ``hosts: files dns`` (no mDNS or systemd-resolved module before DNS; the name is not
in ``/etc/hosts``). The queries the server counts prove every lookup really reached it.

gevent resolves with its default resolver, ``thread`` (GEVENT_RESOLVER is not set): libc's
``getaddrinfo`` runs in gevent's thread pool, and the greenlet that asked waits, within
the connect's bound. So while one lookup is held for 8 s:

- ``/healthz`` answers, again and again, before the held query is answered, and gevent's
  monitor thread reports no greenlet holding the worker's loop (the proof that the worker
  runs; the latency is measured and printed, not asserted);
- the request that needs a new connection waits out ``DB_OUTAGE_WAIT_MS`` (each attempt
  bounded by ``POSTGRES_CONNECT_TIMEOUT_S``, each resolving again) and answers 503 with
  ``Retry-After``, also before the held query is answered: not a worker timeout;
- once DNS answers again, requests succeed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import pytest
import requests

from devstack import free_port
from devstack.processes import GunicornServer
from tests.dns_server import StallingDNS
from tests.helpers import Database, assert_no_secrets

pytestmark = pytest.mark.e2e

# Any loopback address but 127.0.0.1 (the database's) and 127.0.0.53 (systemd-resolved's).
DNS_ADDRESS = "127.0.0.77"
STALL_S = 8.0
OUTAGE_WAIT_MS = 2000
CONNECT_TIMEOUT_S = 1
STATEMENT_TIMEOUT_MS = 5000  # the default: the request's outer bound is the outage wait plus this
PROBE_EVERY_S = 0.2


def _refusal() -> str | None:
    """Why this machine cannot run the test, in one line; None when it can."""
    if os.geteuid() != 0:
        return "needs root: mount --bind inside a mount namespace"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if not Path("/etc/resolv.conf").exists():
        return "no /etc/resolv.conf to bind a test resolv.conf over"
    run = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=10)
    if run.returncode != 0:
        return f"unshare --mount is not permitted here: {run.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture
def dns() -> Iterator[StallingDNS]:
    """The DNS server, answering a name of its own under the reserved .test domain."""
    if (reason := _refusal()) is not None:
        pytest.skip(reason)
    server = StallingDNS(f"db-{secrets.token_hex(4)}.commng.test", DNS_ADDRESS, stall_s=STALL_S)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def namespace(workdir: Path) -> list[str]:
    """A command prefix: a private mount namespace with this test's resolv.conf and nsswitch.conf.

    The bind mounts exist only in the namespace, and vanish with its last process.
    """
    resolv = workdir / "resolv.conf"
    # timeout: longer than the stall, so libc waits it out; one attempt: one query per lookup.
    resolv.write_text(f"nameserver {DNS_ADDRESS}\noptions timeout:{int(STALL_S) + 4} attempts:1\n")
    script = 'mount --bind "$1" /etc/resolv.conf && '
    args = [str(resolv)]
    if Path("/etc/nsswitch.conf").exists():
        nsswitch = workdir / "nsswitch.conf"
        lines = Path("/etc/nsswitch.conf").read_text().splitlines()
        kept = [line for line in lines if not line.strip().startswith("hosts:")]
        nsswitch.write_text("\n".join([*kept, "hosts: files dns", ""]))
        script += 'mount --bind "$2" /etc/nsswitch.conf && shift && '
        args.append(str(nsswitch))
    script += 'shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "namespace", *args]


@dataclass
class Probe:
    """One GET /healthz: its latency, its status, and whether the stall still held when it answered."""

    latency_ms: float
    status: int | None
    during_stall: bool
    stalled_request_open: bool


@dataclass
class StalledRequest:
    """A request in a thread of its own; ``done`` is set when it answered."""

    url: str
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    answered_during_stall: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, dns: StallingDNS) -> None:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=30) as response:  # noqa: S310 - loopback
                self.status, self.headers = response.status, dict(response.headers)
        except urllib.error.HTTPError as exc:
            self.status, self.headers = exc.code, dict(exc.headers)
        except OSError:
            self.status = None  # the worker died or the connection was cut
        self.duration_s = time.monotonic() - started
        self.answered_during_stall = not dns.first_answered.is_set()
        self.done.set()


def probe(url: str, dns: StallingDNS, stalled: StalledRequest) -> Probe:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:  # noqa: S310 - loopback
            status: int | None = response.status
    except OSError:
        status = None
    latency_ms = (time.monotonic() - started) * 1000
    return Probe(latency_ms, status, not dns.first_answered.is_set(), not stalled.done.is_set())


def test_a_stalled_lookup_leaves_the_worker_serving(
    database: Database, moto_endpoint: str, workdir: Path, dns: StallingDNS
) -> None:
    _, _, env = database.watched_env(
        moto_endpoint,
        workdir,
        POSTGRES_HOST=dns.name,
        DB_OUTAGE_WAIT_MS=str(OUTAGE_WAIT_MS),
        POSTGRES_CONNECT_TIMEOUT_S=str(CONNECT_TIMEOUT_S),
        POSTGRES_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
    )
    server = GunicornServer(
        env, free_port(), 1, workdir / "gunicorn.log", monitor_blocking=True, prefix=namespace(workdir)
    )
    # gevent's default resolver, the thread pool: nothing in the environment chooses another.
    assert "GEVENT_RESOLVER" not in server.env
    assert gevent.config.resolver.__module__ == "gevent.resolver.thread"
    assert dns.name not in Path("/etc/hosts").read_text()

    server.start()
    try:
        # Start-up logged in through the name: libc in the namespace asked this server.
        assert dns.count() >= 1
        before = dns.count()
        dns.stall()
        # As a failover does: every backend goes, so the next request needs a new connection.
        database.cluster.terminate_backends(database.role, idle_only=False)
        stalled = StalledRequest(f"{server.url}/api/channels")
        threading.Thread(target=stalled.run, args=(dns,), daemon=True).start()
        assert dns.held.wait(10), "the lookup never reached the DNS server"

        probes: list[Probe] = []
        while not dns.first_answered.wait(PROBE_EVERY_S):
            probes.append(probe(server.url, dns, stalled))
        assert stalled.done.wait(10)
        held_queries = dns.count() - before
        dns.end_stall()

        # Requests succeed again once DNS answers: each new connection resolves again.
        database.cluster.terminate_backends(database.role, idle_only=False)
        assert requests.get(f"{server.url}/api/channels", timeout=10).status_code == 200
        assert (
            requests.post(f"{server.url}/api/channels", json={"name": "after"}, timeout=10).status_code == 201
        )
    finally:
        code = server.stop()

    output = server.output()
    during = [p for p in probes if p.during_stall]
    while_open = [p for p in during if p.stalled_request_open]
    latencies = sorted(p.latency_ms for p in during)
    print(  # the figures the issue asks for; `pytest -s` shows them
        f"\nDNS stall {max(dns.stall_durations):.2f} s, {held_queries} lookups held; "
        f"/healthz during it: {len(during)} probes, median {latencies[len(latencies) // 2]:.1f} ms, "
        f"max {latencies[-1]:.1f} ms; stalled request: {stalled.status} in {stalled.duration_s:.2f} s"
    )
    # The worker ran throughout: /healthz answered while the lookup was held and the
    # stalled request was still waiting, and no greenlet held the loop (not even for 100 ms).
    assert while_open, "no /healthz answered while the stalled request waited"
    assert all(p.status == 200 for p in during), during
    reports = server.blocking_reports()
    assert reports == [], f"{len(reports)} blocking reports; the first:\n{reports[0]}"
    # The stalled request ended within its bound, before DNS answered: a 503 to retry.
    assert stalled.status == 503, (stalled, server.problems())
    assert stalled.headers.get("Retry-After") == "1"
    assert stalled.answered_during_stall
    assert OUTAGE_WAIT_MS / 1000 <= stalled.duration_s <= (OUTAGE_WAIT_MS + STATEMENT_TIMEOUT_MS) / 1000
    assert max(dns.stall_durations) >= STALL_S - 0.5  # the first lookup was held the whole time
    assert "WORKER TIMEOUT" not in output
    assert code == 0
    assert_no_secrets(output, [database.password])
