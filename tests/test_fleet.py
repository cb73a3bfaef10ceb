"""The fleet table (one row per worker and bind) and the admin fleet view, against real PostgreSQL."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

from commng.db import db
from commng_rotation.events import worker_name
from commng_rotation.fleet import FleetReporter, rotation_workers
from commng_rotation.runtime import Runtime, get_runtime
from devstack import new_password, rotate_secret
from tests.helpers import Database, assert_no_secrets, wait_for

TOKEN = "fleet-admin-token-0123456789"


@pytest.fixture
def fleet_app(database: Database, secretsmanager: Any, secret: str, make_app: Any) -> Flask:
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, admin_token=TOKEN
    )
    app: Flask = make_app(settings, secrets_client=secretsmanager)
    return app


def _reporter(runtime: Runtime) -> FleetReporter:
    assert runtime.fleet is not None
    return runtime.fleet


def _rows(app: Flask) -> dict[str, dict[str, Any]]:
    with app.app_context(), db.engine.connect() as conn:
        return {r.worker: dict(r._mapping) for r in conn.execute(sa.select(rotation_workers))}


def _put(app: Flask, worker: str, version: str, age: timedelta) -> None:
    """A row of another worker (another task), last written ``age`` ago."""
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(
            sa.insert(rotation_workers).values(
                service="commng",
                worker=worker,
                bind="",
                current_version=version,
                last_check_at=datetime.now(UTC) - age,
                updated_at=sa.func.now() - age,
            )
        )


def test_every_check_upserts_this_workers_row(
    fleet_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(fleet_app)
    assert runtime.watcher is not None
    runtime.watcher.check_once()
    wait_for(lambda: worker_name() in _rows(fleet_app), timeout_s=10)
    first = _rows(fleet_app)[worker_name()]
    assert first["bind"] == ""
    assert first["current_version"] == runtime.rotator().current.version_id  # type: ignore[union-attr]
    assert first["last_check_at"] is not None

    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, new_password())
    runtime.watcher.check_once()
    wait_for(lambda: _rows(fleet_app)[worker_name()]["current_version"] == version, timeout_s=10)
    row = _rows(fleet_app)[worker_name()]
    assert row["updated_at"] >= first["updated_at"]
    assert row["last_refresh_at"] > first["last_refresh_at"]
    assert len(_rows(fleet_app)) == 1  # an upsert, not a new row per check


def test_workers_not_seen_for_three_intervals_age_out(fleet_app: Flask) -> None:
    # The test settings poll every 1 s: 3 intervals are 3 s.
    _put(fleet_app, "gone-task:7", "v-old", timedelta(seconds=10))
    _put(fleet_app, "other-task:8", "v-old", timedelta(seconds=0))

    assert _reporter(get_runtime(fleet_app)).report_once()

    assert set(_rows(fleet_app)) == {worker_name(), "other-task:8"}
    assert _reporter(get_runtime(fleet_app)).aged_out == 1


def test_a_stopping_worker_removes_its_own_rows(fleet_app: Flask) -> None:
    reporter = _reporter(get_runtime(fleet_app))
    assert reporter.report_once()
    reporter.stop()
    assert worker_name() not in _rows(fleet_app)
    reporter.touch()  # stopped: writes nothing any more
    assert worker_name() not in _rows(fleet_app)


def test_the_admin_fleet_api_and_page_show_who_is_behind(
    fleet_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(fleet_app)
    assert runtime.watcher is not None
    password = new_password()
    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, password)
    runtime.watcher.check_once()
    wait_for(lambda: runtime.rotator().draining == [], timeout_s=10)
    assert runtime.history.flush()
    assert _reporter(runtime).report_once()
    _put(fleet_app, "other-task:8", "v-old", timedelta(seconds=0))
    client = fleet_app.test_client()

    assert client.get("/admin/api/fleet").status_code == 401
    response = client.get("/admin/api/fleet", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    view = response.get_json()
    assert (view["secret_current_version"], view["current_version_source"]) == (version, "secretsmanager")
    assert (view["on_current"], view["total"]) == (1, 2)
    on = {w["worker"]: w["on_current"] for w in view["workers"]}
    assert on == {worker_name(): True, "other-task:8": False}
    (rotation,) = view["rotations"]
    assert rotation["version"] == version
    (timeline,) = rotation["workers"]
    assert timeline["trigger"] == "poll"
    assert 0 <= timeline["detected_s"] <= timeline["swapped_s"] <= timeline["drained_s"]

    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    page = client.get("/admin/", headers={"Authorization": f"Basic {basic}"})
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "1 of 2 workers on the current version" in html
    assert 'class="behind"' in html
    assert "OLDER" in html
    assert "<svg" in html
    assert "<script" not in html
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert_no_secrets(html + response.get_data(as_text=True), [database.password, password])


def test_each_binds_rows_are_compared_with_that_binds_own_secret(
    fleet_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica row on its own secret's AWSCURRENT is on the current version, not behind."""
    runtime = get_runtime(fleet_app)
    primary_version = runtime.rotator().source.current_version_id()
    replica_source = SimpleNamespace(watchable=True, current_version_id=lambda: "v-replica-current")
    monkeypatch.setitem(
        runtime.rotators,
        "replica",
        SimpleNamespace(current=None, source=replica_source),  # type: ignore[arg-type]
    )
    with fleet_app.app_context(), db.engine.begin() as conn:
        for worker, bind, version in (
            ("task-a:1", "", primary_version),
            ("task-a:1", "replica", "v-replica-current"),
            ("task-b:2", "replica", "v-replica-old"),
        ):
            conn.execute(
                sa.insert(rotation_workers).values(
                    service="commng",
                    worker=worker,
                    bind=bind,
                    current_version=version,
                    last_check_at=datetime.now(UTC),
                    updated_at=sa.func.now(),
                )
            )
    response = fleet_app.test_client().get("/admin/api/fleet", headers={"Authorization": f"Bearer {TOKEN}"})

    view = response.get_json()
    assert view["bind_current_versions"] == {"replica": "v-replica-current"}
    on = {(w["worker"], w["bind"]): w["on_current"] for w in view["workers"] if w["worker"] != worker_name()}
    assert on == {("task-a:1", None): True, ("task-a:1", "replica"): True, ("task-b:2", "replica"): False}
