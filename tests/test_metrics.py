"""Metrics through the Flask test client: the process-local registry (no multiprocess dir).

Metrics are process-wide and tests share the process, so every assertion compares a
value before and after the action under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from commng.db import db
from commng.observability import metrics, pools
from commng_rotation.runtime import get_runtime
from commng_rotation.watcher import DEGRADED_AFTER_FAILURES
from config import ConfigError, load_settings
from devstack import new_password
from tests.helpers import Database, assert_no_secrets, wait_for


@pytest.fixture(autouse=True)
def _process_local_registry() -> Iterator[None]:
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR"), "unit tests read the process-local registry"
    return


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _refreshes(trigger: str, outcome: str) -> float:
    return _value("commng_db_credential_refreshes_total", trigger=trigger, outcome=outcome)


@pytest.fixture
def public_client(database: Database, make_app: Any) -> Any:
    """A test client of an app whose /metrics is public (METRICS_PUBLIC=true)."""
    return make_app(database.settings(metrics_public=True)).test_client()


def _scrape(client: Any, **headers: str) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text: str = response.get_data(as_text=True)
    return text


def test_metrics_lists_every_series_and_is_not_counted_itself(public_client: Any) -> None:
    text = _scrape(public_client)
    _scrape(public_client)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "commng_db_credential_refreshes",
        "commng_secret_checks",
        "commng_secret_fetch_errors",
        "commng_rotation_detection_seconds",
        "commng_db_engine_swap_seconds",
        "commng_db_old_pool_drain_seconds",
        "commng_db_auth_failures",
        "commng_db_pool_connections",
        "commng_db_engines",
        "commng_secret_watcher_consecutive_failures",
        "commng_http_requests",
        "commng_http_request_duration_seconds",
    } <= families
    assert _value("commng_http_requests_total", method="GET", route="/metrics", status="200") == 0.0


def test_requests_are_counted_by_route_not_path(public_client: Any) -> None:
    client = public_client
    route = "/api/channels/<int:channel_id>/messages"
    ok_before = _value("commng_http_requests_total", method="GET", route=route, status="404")
    unmatched = _value("commng_http_requests_total", method="GET", route="<unmatched>", status="404")
    timed = _value("commng_http_request_duration_seconds_count", method="GET", route=route)

    assert client.get("/api/channels/123456/messages").status_code == 404
    assert client.get("/api/channels/654321/messages").status_code == 404
    assert client.get("/no/such/path").status_code == 404

    assert _value("commng_http_requests_total", method="GET", route=route, status="404") == ok_before + 2
    assert _value("commng_http_requests_total", method="GET", route="<unmatched>", status="404") == (
        unmatched + 1
    )
    assert _value("commng_http_request_duration_seconds_count", method="GET", route=route) == timed + 2
    assert "/api/channels/123456/messages" not in _scrape(client)


def test_metrics_are_private_by_default_behind_their_own_token(database: Database, make_app: Any) -> None:
    assert load_settings({"POSTGRES_USER": "u"}).metrics_public is False
    token = "metrics-token-0123456789+/="
    admin_token = "admin-token-0123456789abcdef"
    client = make_app(database.settings(metrics_token=token, admin_token=admin_token)).test_client()
    refused = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {token}"}]
    # The admin token does not open /metrics: the scraper's token and the admin's are apart.
    refused.append({"Authorization": f"Bearer {admin_token}"})
    for headers in refused:
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json["error"]["code"] == "unauthorized"
    _scrape(client, Authorization=f"Bearer {token}")
    # ... and the metrics token opens nothing under /admin.
    admin = client.get("/admin/api/status", headers={"Authorization": f"Bearer {token}"})
    assert admin.status_code == 401

    # No metrics token configured and not public: nobody may read them, the admin included.
    hidden = make_app(database.settings(admin_token=admin_token)).test_client()
    response = hidden.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"})
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"

    # METRICS_PUBLIC=true opens them, a token or not.
    opened = make_app(database.settings(metrics_public=True, metrics_token=token)).test_client()
    _scrape(opened)


def test_metrics_token_is_checked_and_must_differ_from_the_admin_token() -> None:
    with pytest.raises(ConfigError, match=r"^METRICS_TOKEN must be at least 16") as short:
        load_settings({"POSTGRES_USER": "u", "METRICS_TOKEN": "short-secret"})
    assert "short-secret" not in str(short.value)
    same = "the-same-token-0123456789"
    with pytest.raises(ConfigError, match=r"^METRICS_TOKEN must differ from ADMIN_TOKEN") as both:
        load_settings({"POSTGRES_USER": "u", "METRICS_TOKEN": same, "ADMIN_TOKEN": same})
    assert same not in str(both.value)


def test_rotation_feeds_refresh_check_swap_detection_and_drain_metrics(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    watcher = runtime.watcher
    assert watcher is not None
    rotated = _refreshes("poll", "rotated")
    changed = _value("commng_secret_checks_total", result="changed")
    unchanged = _value("commng_secret_checks_total", result="unchanged")
    swaps = _value("commng_db_engine_swap_seconds_count")
    detections = _value("commng_rotation_detection_seconds_count")
    drains = _value("commng_db_old_pool_drain_seconds_count")
    client = secret_app.test_client()
    assert client.get("/readyz").status_code == 200  # the old pool has a connection to drain
    assert watcher.check_once()[0].change == "unchanged"

    new = new_password()
    database.cluster.set_password(database.role, new)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
    assert watcher.check_once()[0].outcome == "rotated"

    assert _refreshes("poll", "rotated") == rotated + 1
    assert _value("commng_secret_checks_total", result="changed") == changed + 1
    assert _value("commng_secret_checks_total", result="unchanged") == unchanged + 1
    assert _value("commng_db_engine_swap_seconds_count") == swaps + 1
    assert _value("commng_rotation_detection_seconds_count") == detections + 1
    wait_for(lambda: _value("commng_db_old_pool_drain_seconds_count") == drains + 1)
    wait_for(lambda: not runtime.rotator().draining)
    assert _value("commng_db_engines", state="draining") == 0
    assert _value("commng_db_engines", state="active") == 1
    assert_no_secrets(metrics.render().decode(), [database.password, new])


def test_secrets_manager_errors_are_counted_and_degrade_the_status_not_healthz(
    secret_app: Flask, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    watcher = runtime.watcher
    assert watcher is not None
    code = "ResourceNotFoundException"
    errors = _value("commng_secret_checks_total", result="error")
    fetch_errors = _value("commng_secret_fetch_errors_total", code=code)
    secretsmanager.delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True)
    client = secret_app.test_client()

    for n in range(1, DEGRADED_AFTER_FAILURES + 1):
        assert runtime.status()["degraded"] is False
        result = watcher.check_once()[0]
        assert (result.change, result.error, result.unavailable) == ("error", code, True)
        assert _value("commng_secret_watcher_consecutive_failures") == n
        assert client.get("/healthz").status_code == 200

    assert runtime.status()["degraded"] is True
    assert _value("commng_secret_checks_total", result="error") == errors + DEGRADED_AFTER_FAILURES
    assert _value("commng_secret_fetch_errors_total", code=code) == fetch_errors + DEGRADED_AFTER_FAILURES
    assert client.get("/readyz").status_code == 200  # the current login still works


def test_startup_failure_recorded_before_metrics_existed_is_counted(
    database: Database, make_app: Any, secretsmanager: Any
) -> None:
    failed = _refreshes("startup", "failed")
    fetch_errors = _value("commng_secret_fetch_errors_total", code="ResourceNotFoundException")
    make_app(database.settings(db_secret_id="arn:missing"), secrets_client=secretsmanager)
    assert _refreshes("startup", "failed") == failed + 1
    assert _value("commng_secret_fetch_errors_total", code="ResourceNotFoundException") == fetch_errors + 1


def test_refused_logins_are_counted_and_readyz_goes_503(database: Database, make_app: Any) -> None:
    client = make_app(database.settings()).test_client()
    assert client.get("/readyz").status_code == 200
    failures = _value("commng_db_auth_failures_total")
    database.cluster.set_password(database.role, new_password())  # nobody told the app
    database.cluster.terminate_backends(database.role)

    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["reason"] == "database authentication failed"
    assert _value("commng_db_auth_failures_total") >= failures + 1
    assert client.get("/healthz").status_code == 200


def _pool(app: Flask) -> dict[str, int]:
    """The active engine's own counters, to compare with what the gauges say."""
    return get_runtime(app).rotator().active.pool_figures()  # type: ignore[union-attr]


def test_pool_gauges_follow_checkouts_and_checkins(database: Database, make_app: Any) -> None:
    baseline = metrics.pool_figures()
    app = make_app(database.settings(postgres_pool_size=2, postgres_max_overflow=2))
    with app.app_context():
        engine = db.engine
        with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            for conn in (a, b, c):
                conn.execute(sa.text("SELECT 1"))
            held = metrics.pool_figures()
            assert held["checked_out"] - baseline["checked_out"] == 3 == _pool(app)["checked_out"]
            assert held["overflow"] - baseline["overflow"] == 1 == _pool(app)["overflow"]
            assert _value("commng_db_pool_connections", state="checked_out") == held["checked_out"]
        back = metrics.pool_figures()
        # Two go back to the pool; the overflow connection is closed on return.
        assert back["checked_out"] == baseline["checked_out"]
        assert back["idle"] - baseline["idle"] == 2 == _pool(app)["idle"]
        assert back["overflow"] == baseline["overflow"]
        assert _value("commng_db_pool_connections", state="idle") == back["idle"]
    get_runtime(app).stop()
    assert metrics.pool_figures() == baseline


def test_the_pool_gauge_is_published_shortly_after_its_events_without_a_scrape(
    database: Database, make_app: Any
) -> None:
    baseline = metrics.pool_figures()  # publishes what is pending
    app = make_app(database.settings(postgres_pool_size=2, postgres_max_overflow=0))
    with app.app_context(), db.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        # Nothing asks for the figures: the publish scheduled by the checkout writes them.
        wait_for(
            lambda: _value("commng_db_pool_connections", state="checked_out") == baseline["checked_out"] + 1,
            timeout_s=pools.PUBLISH_DELAY_S + 5,
        )
    wait_for(
        lambda: _value("commng_db_pool_connections", state="checked_out") == baseline["checked_out"],
        timeout_s=pools.PUBLISH_DELAY_S + 5,
    )
    get_runtime(app).stop()


def test_metrics_init_app_refuses_to_run_twice(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="already called"):
        metrics.init_app(app)
