"""The persisted rotation history: real PostgreSQL, moto, and gunicorn end to end (its admin
API, the admin page, and that page in a real browser)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from flask import Flask
from moto.server import ThreadedMotoServer

from commng.db import db
from commng_rotation import history
from commng_rotation.events import RotationEvent
from commng_rotation.runtime import get_runtime
from devstack import PostgresCluster, free_port, new_password, rotate_secret
from devstack.processes import GunicornServer
from tests.helpers import Database, assert_no_secrets, drop_database, new_database, wait_for

TOKEN = "history-admin-token-0123456789"
# gunicorn's gevent worker waits out graceful_timeout for a kept-alive connection, even
# one the client has closed: these tests ask for Connection: close to stop in seconds.
CLOSE = {"Connection": "close"}


def _rows(app: Flask) -> list[dict[str, Any]]:
    """Every history row, oldest first."""
    with app.app_context():
        table = history.rotation_events
        with db.engine.connect() as conn:
            query = sa.select(table).order_by(table.c.occurred_at, table.c.id)
            return [dict(r._mapping) for r in conn.execute(query)]


def _flushed(app: Flask) -> history.HistoryWriter:
    writer = get_runtime(app).history
    assert writer.flush(), writer.last_error
    return writer


def test_a_rotation_is_written_then_updated_with_drained_ms(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    new = new_password()
    database.cluster.set_password(database.role, new)
    put = secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))

    runtime.watcher.check_once()  # type: ignore[union-attr]
    _flushed(secret_app)

    (row,) = _rows(secret_app)
    event = runtime.events.recent(1)[0]
    assert row["id"] == event.id
    assert (row["trigger"], row["outcome"], row["new_version"]) == ("poll", "rotated", put["VersionId"])
    assert row["worker"] == event.worker
    assert row["swap_ms"] is not None
    assert row["error"] is None
    wait_for(lambda: event.drained_ms is not None)
    wait_for(lambda: _flushed(secret_app) and _rows(secret_app)[0]["drained_ms"] is not None)
    assert len(_rows(secret_app)) == 1
    assert_no_secrets(json.dumps(_rows(secret_app), default=str), [database.password, new])


def test_a_failed_refresh_is_written_as_failed_and_nothing_else(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    bad = new_password()
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(bad))

    results = get_runtime(secret_app).watcher.check_once()  # type: ignore[union-attr]
    _flushed(secret_app)

    assert [r.outcome for r in results] == ["failed"]
    rows = _rows(secret_app)
    assert [(r["trigger"], r["outcome"], r["error"]) for r in rows] == [
        ("poll", "failed", "OperationalError:28P01")
    ]
    assert rows[0]["new_version"] is None
    assert rows[0]["swap_ms"] is None
    assert_no_secrets(json.dumps(rows, default=str), [database.password, bad])


def test_events_recorded_while_the_database_is_unreachable_are_written_later_in_order(
    secret_app: Flask, database: Database, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING)
    runtime = get_runtime(secret_app)
    writer = get_runtime(secret_app).history
    with database.login_refused():
        for _ in range(3):
            runtime.watcher.check_once(trigger="manual")  # type: ignore[union-attr]
        manual = [e.id for e in reversed(runtime.events.recent(10)) if e.trigger == "manual"]
        assert len(manual) == 3
        assert writer.flush() is False
        assert writer.pending >= 3
        assert writer.last_error is not None

    wait_for(lambda: writer.flush(), timeout_s=15)

    rows = _rows(secret_app)
    assert [r["id"] for r in rows if r["trigger"] == "manual"] == manual
    assert {r["outcome"] for r in rows if r["trigger"] == "manual"} == {"unchanged"}
    assert writer.pending == 0
    assert writer.dropped == 0
    assert "rotation_history_write_failed" in caplog.text


def test_past_the_bound_the_oldest_unwritten_events_are_dropped_with_a_warning(
    app: Flask, database: Database, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING)
    runtime = get_runtime(app)
    writer = get_runtime(app).history
    writer.maxlen = 3
    with database.login_refused():
        events = [runtime.events.record(RotationEvent("manual", "unchanged")) for _ in range(5)]
        assert writer.flush() is False
        assert (writer.pending, writer.dropped) == (3, 2)
    wait_for(lambda: writer.flush(), timeout_s=15)
    assert [r["id"] for r in _rows(app)] == [e.id for e in events[2:]]
    assert caplog.text.count("rotation_history_events_dropped") == 2


def test_rows_past_the_retention_limit_are_pruned_at_most_once_an_hour(app: Flask) -> None:
    runtime = get_runtime(app)
    writer = get_runtime(app).history
    old = datetime.now(UTC) - writer.retention - timedelta(days=1)

    runtime.events.record(RotationEvent("manual", "unchanged", occurred_at=old))
    keep = runtime.events.record(RotationEvent("manual", "unchanged"))
    _flushed(app)
    assert [r["id"] for r in _rows(app)] == [keep.id]  # the first write also prunes

    stale = runtime.events.record(RotationEvent("manual", "unchanged", occurred_at=old))
    _flushed(app)
    assert {r["id"] for r in _rows(app)} == {stale.id, keep.id}  # not again within the hour

    writer._last_prune = (writer._last_prune or 0.0) - history.PRUNE_EVERY_S
    runtime.events.record(RotationEvent("manual", "unchanged"))
    _flushed(app)
    assert stale.id not in {r["id"] for r in _rows(app)}


def test_the_startup_attempt_recorded_before_anyone_listened_is_written(
    database: Database, secretsmanager: Any, make_app: Any
) -> None:
    # The secret does not exist: start-up falls back to the environment and records why.
    app = make_app(database.settings(db_secret_id="db/missing"), secrets_client=secretsmanager)
    _flushed(app)
    rows = _rows(app)
    assert [(r["trigger"], r["outcome"]) for r in rows] == [("startup", "failed")]
    assert rows[0]["error"]
    assert "ResourceNotFound" in rows[0]["error"]


def test_cli_prints_the_history_as_a_table(app: Flask, database: Database) -> None:
    runtime = get_runtime(app)
    runtime.events.record(RotationEvent("manual", "failed", error="OperationalError:28P01"))
    runtime.events.record(
        RotationEvent("poll", "rotated", old_version="v-old", new_version="v-new", swap_ms=12.3)
    )
    runtime.events.record(RotationEvent("push", "rotated", bind="replica", new_version="v-replica"))
    _flushed(app)

    result = app.test_cli_runner().invoke(args=["rotation", "history", "--limit", "5"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:5] == ["occurred_at", "worker", "bind", "trigger", "outcome"]
    assert lines[1].split()[3:6] == ["replica", "push", "rotated"]  # date and time are two words
    assert "v-replica" in lines[1]
    assert lines[2].split()[3:6] == ["primary", "poll", "rotated"]
    assert "v-new" in lines[2]
    assert "12.3" in lines[2]
    assert "FAILED" in lines[3]
    assert "OperationalError:28P01" in lines[3]
    assert_no_secrets(result.output, [database.password])
    bad = app.test_cli_runner().invoke(args=["rotation", "history", "--limit", "0"])
    assert bad.exit_code != 0


# -- end to end -------------------------------------------------------------------------


def _rotations(server: GunicornServer) -> list[dict[str, Any]]:
    response = requests.get(
        f"{server.url}/admin/api/rotations?limit=200",
        headers={"Authorization": f"Bearer {TOKEN}", **CLOSE},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def _log_pids(server: GunicornServer, event: str, **fields: str) -> set[int]:
    """pids of the workers that logged ``event`` (a quoted name) with ``fields``."""
    pids = set()
    for line in server.output().splitlines():
        if event in line:
            record = json.loads(line)
            if all(record.get(k) == v for k, v in fields.items()):
                pids.add(record["pid"])
    return pids


def _refreshed_workers(server: GunicornServer, version: str) -> set[int]:
    return _log_pids(server, '"refresh_succeeded"', new_version=version)


@dataclass
class RotatedStack:
    """gunicorn (2 gevent workers) on moto and PostgreSQL, after one rotation both workers saw."""

    server: GunicornServer
    version: str
    passwords: list[str]


@pytest.fixture(scope="module")
def rotated_stack(pg: PostgresCluster) -> Iterator[RotatedStack]:
    """Start the stack, rotate once, wait until both rotated rows hold drained_ms; stop after.

    One stack for the module's end-to-end tests, which only read it (the admin API, the page,
    the page in a browser): each starting its own cost a gunicorn start, a rotation and a stop.
    """
    database = new_database(pg)
    workdir = Path(tempfile.mkdtemp(prefix="commng-history-"))
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    try:
        client, arn, env = database.watched_env(
            f"http://127.0.0.1:{moto_port}",
            workdir,
            POSTGRES_POOL_SIZE="3",
            DB_POOL_GRACE_PERIOD_MS="1000",
            ADMIN_TOKEN=TOKEN,
        )
        server = GunicornServer(env, free_port(), 2, workdir / "gunicorn.log", monitor_blocking=True)
        new = new_password()
        server.start()
        try:
            version = rotate_secret(client, arn, database.cluster, database.role, new)
            wait_for(lambda: len(_refreshed_workers(server, version)) == 2, timeout_s=20)

            def settled() -> bool:
                rotated = [e for e in _rotations(server) if e["outcome"] == "rotated"]
                return len(rotated) == 2 and all(e["drained_ms"] is not None for e in rotated)

            wait_for(settled, timeout_s=20)
            # The stack's own admin calls carry the right token (the tests check theirs).
            assert '"admin_auth_failed"' not in server.output()
            stack = RotatedStack(server, version, [database.password, new])
            yield stack
        finally:
            code = server.stop()
        assert code == 0
        assert_no_secrets(server.output(), [*stack.passwords, TOKEN])
        assert server.blocking_reports() == []
    finally:
        moto.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.e2e
def test_gunicorn_workers_each_write_their_rotation(rotated_stack: RotatedStack) -> None:
    server, version = rotated_stack.server, rotated_stack.version
    before = len(server.output())
    events = _rotations(server)
    rotated = [e for e in events if e["outcome"] == "rotated"]
    assert {e["new_version"] for e in rotated} == {version}
    pids = {int(e["worker"].rsplit(":", 1)[1]) for e in rotated}
    assert pids == _refreshed_workers(server, version)
    assert Counter(e["worker"] for e in rotated).most_common(1)[0][1] == 1
    assert [e for e in events if e["outcome"] == "failed"] == []

    page = requests.get(f"{server.url}/admin/", auth=("admin", TOKEN), headers=CLOSE, timeout=10)
    assert page.status_code == 200
    assert version in page.text
    output = server.output()
    assert '"admin_auth_failed"' not in output[before:]
    assert_no_secrets("\n".join([json.dumps(events), page.text, output]), [*rotated_stack.passwords, TOKEN])


# What the machine's closed network needs: no background fetches, no first-run work.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    """Debian's chromium (`make test-packages` installs it as root). Missing: skip, but fail in CI."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        message = (
            "chromium is not installed: sudo apt-get install -y chromium (or `make test-packages` as root)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.mark.e2e
def test_the_page_in_a_real_browser_shows_the_rotation(rotated_stack: RotatedStack, tmp_path: Path) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    stack = rotated_stack
    with sync_playwright() as pw:
        args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            context = browser.new_context(
                http_credentials={"username": "admin", "password": TOKEN},
                viewport={"width": 1400, "height": 1000},
                extra_http_headers={"Connection": "close"},
            )
            page = context.new_page()
            response = page.goto(f"{stack.server.url}/admin/")
            assert response is not None
            assert response.status == 200
            rows = page.locator("#history tr.rotated", has_text=stack.version)
            assert rows.count() == 2  # one per worker
            assert page.locator("#status").inner_text().count(stack.version) >= 1
            page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
            html = page.content()
            context.close()
        finally:
            browser.close()
    assert (tmp_path / "admin.png").stat().st_size > 10_000
    assert_no_secrets(html, [*stack.passwords, TOKEN])
