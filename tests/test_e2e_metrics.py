"""End to end: /metrics and the logs of gunicorn with 2 gevent workers through a rotation.

The bar from the issue: whichever worker answers the scrape, it reports the refreshes
of all workers (workers x rotations); the pool gauges move under load; counters survive
a worker restart; every line gunicorn and the workers print is a JSON object with
event, level and timestamp; the request id links the access log to the app's lines;
and no password appears in a log line or a metric.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devstack import free_port, new_password, rotate_secret
from devstack.processes import GunicornServer, LoadGenerator
from tests.helpers import Database, assert_no_secrets, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2
POOL_SIZE = 3
BOOTING = re.compile(r"Booting worker with pid: (\d+)")
REQUEST_ID = "e2e-request-in-the-window"


def _scrape(server: GunicornServer) -> str:
    # A new connection per scrape, so that the kernel may hand it to either worker.
    response = requests.get(f"{server.url}/metrics", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    return response.text


def _sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _rotated(text: str) -> float:
    return _sum(text, "commng_db_credential_refreshes_total", outcome="rotated")


def _booted(server: GunicornServer) -> list[int]:
    return [int(pid) for pid in BOOTING.findall(server.output())]


def _records(server: GunicornServer) -> list[dict[str, Any]]:
    """Every line of gunicorn's output as JSON; fails on the first line that is not."""
    records = []
    for line in server.output().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line[:300]!r}") from None
    return records


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_metrics_and_logs_across_workers_through_a_rotation_and_a_restart(
    database: Database, moto_endpoint: str, workdir: Path
) -> None:
    client, arn, env = database.watched_env(
        moto_endpoint, workdir, POSTGRES_POOL_SIZE=str(POOL_SIZE), DB_POOL_GRACE_PERIOD_MS="1000"
    )
    env["METRICS_PUBLIC"] = "true"  # scraped without a token; private by default
    server = GunicornServer(env, free_port(), WORKERS, workdir / "gunicorn.log")
    passwords = [database.password]
    scrapes: list[str] = []
    server.start()
    try:
        channels = [
            requests.post(f"{server.url}/api/channels", json={"name": f"m-{i}"}, timeout=10).json()["id"]
            for i in range(2)
        ]
        load = LoadGenerator(server.url, channels, clients=4, max_s=120)
        load.start()
        try:
            # Event-driven gauges: connections are checked out at some scrape under load.
            wait_for(lambda: _sum(_scrape(server), "commng_db_pool_connections", state="checked_out") > 0)
            busy = _scrape(server)
            assert _sum(busy, "commng_db_pool_connections") > 0
            new = new_password()
            passwords.append(new)
            rotate_secret(client, arn, database.cluster, database.role, new, 1.0)
            wait_for(lambda: _rotated(_scrape(server)) == WORKERS, timeout_s=20)
        finally:
            result = load.stop()
        assert len(result.samples) > 20, "the load generator did not run"
        assert result.failures == [], result.failures[:5]

        # Whichever worker answers, it reports every worker's refresh: workers x rotations.
        scrapes += [_scrape(server) for _ in range(6)]
        assert [_rotated(text) for text in scrapes] == [WORKERS * 1.0] * len(scrapes)
        assert _sum(scrapes[-1], "commng_db_engines", state="active") == WORKERS
        assert _sum(scrapes[-1], "commng_db_engine_swap_seconds_count") == WORKERS
        wait_for(lambda: _sum(_scrape(server), "commng_db_old_pool_drain_seconds_count") == WORKERS)
        requests_before = _sum(scrapes[-1], "commng_http_requests_total")

        # A worker dies and gunicorn replaces it: its counters stay in the sums.
        pids = _booted(server)
        assert len(pids) == WORKERS
        os.kill(pids[0], signal.SIGTERM)
        wait_for(lambda: len(_booted(server)) == WORKERS + 1 and not _alive(pids[0]), timeout_s=40)
        wait_for(lambda: _sum(_scrape(server), "commng_db_engines", state="active") == WORKERS, timeout_s=30)
        after = _scrape(server)
        scrapes.append(after)
        assert _rotated(after) == WORKERS
        assert _sum(after, "commng_db_engine_swap_seconds_count") == WORKERS
        assert _sum(after, "commng_http_requests_total") >= requests_before

        # A second rotation, with a request in its window whose worker must log in again:
        # the reactive refresh runs inside that request and logs with its id.
        newer = new_password()
        passwords.append(newer)
        answers: list[requests.Response] = []

        def request_in_the_window() -> None:
            # The pools' idle backends only: a LISTEN connection killed too would log in again
            # on its own, and its refresh (no request id) could come first, under load.
            database.cluster.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = %s AND application_name = 'commng' AND state = 'idle'",
                (database.role,),
            )
            # Connection: close: kept alive, the answer held below would hold its worker's
            # graceful stop for graceful_timeout (25 s).
            headers = {"X-Request-ID": REQUEST_ID, "Connection": "close"}
            answers.append(requests.get(f"{server.url}/api/channels", headers=headers, timeout=20))

        rotate_secret(
            client, arn, database.cluster, database.role, newer, before_current=request_in_the_window
        )
        assert answers[0].status_code == 200
        assert answers[0].headers["X-Request-ID"] == REQUEST_ID
        # The replacement worker never saw rotation 1, the dead one did: still workers x rotations.
        wait_for(lambda: _rotated(_scrape(server)) == WORKERS * 2, timeout_s=20)
        scrapes.append(_scrape(server))
    finally:
        code = server.stop()
    assert code == 0

    records = _records(server)  # raises on any line that is not JSON
    for record in records:
        assert {"event", "level", "timestamp"} <= set(record), record
    assert records[0]["event"].startswith("Starting gunicorn")
    access = [r for r in records if r["event"] == "http_request"]
    assert access
    assert all({"method", "path", "status", "duration_ms", "request_id"} <= set(r) for r in access)
    assert not [r for r in access if r["path"] == "/metrics" and r["status"] != 200]
    tagged = [r for r in records if r.get("request_id") == REQUEST_ID]
    assert [r["status"] for r in tagged if r["event"] == "http_request"] == [200]
    assert {"rotation_detected", "refresh_succeeded"} <= {r["event"] for r in tagged}
    assert_no_secrets(server.output() + "".join(scrapes), passwords)
