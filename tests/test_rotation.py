"""The rotation layer against real PostgreSQL (scram) and moto Secrets Manager."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from moto.server import ThreadedMotoServer

from commng.app import replica_rotation_settings
from commng.db import db
from commng_rotation.credentials import InvalidSecret, SecretsManagerSource, parse_secret
from commng_rotation.runtime import get_runtime
from config import Settings
from devstack import free_port, new_password, rotate_secret
from tests.helpers import Database, assert_no_secrets, wait_for


def _post_channel(app: Flask, name: str) -> int:
    response = app.test_client().post("/api/channels", json={"name": name})
    assert response.status_code == 201, response.json
    channel_id: int = response.json["id"]
    return channel_id


def _engine(app: Flask) -> sa.Engine:
    with app.app_context():
        return db.engine


def _drained(app: Flask) -> bool:
    return not get_runtime(app).rotator().draining


def test_startup_reads_the_secret_and_serves(secret_app: Flask, database: Database) -> None:
    runtime = get_runtime(secret_app)
    assert runtime.rotator().current is not None
    assert runtime.rotator().source.name == "secretsmanager"
    assert secret_app.test_client().get("/readyz").status_code == 200
    _post_channel(secret_app, "boot")


def test_put_secret_value_rotation_swaps_and_drains(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    runtime = get_runtime(secret_app)
    _post_channel(secret_app, "before")
    baseline = database.backends()
    old_engine = _engine(secret_app)
    new = new_password()
    database.cluster.set_password(database.role, new)
    put = secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))

    results = runtime.watcher.check_once()  # type: ignore[union-attr]

    assert [(r.change, r.outcome) for r in results] == [("changed", "rotated")]
    assert _engine(secret_app) is not old_engine
    event = runtime.events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == ("poll", "rotated", put["VersionId"])
    assert event.swap_ms is not None
    assert event.detection_latency_ms is not None
    wait_for(lambda: _drained(secret_app))
    assert event.drained_ms is not None
    assert old_engine.pool.checkedin() == 0
    _post_channel(secret_app, "after")
    wait_for(lambda: database.backends() <= baseline)
    assert runtime.watcher.check_once()[0].change == "unchanged"  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records]
    for name in ("rotation_detected", "refresh_started", "refresh_succeeded", "old_pool_closed"):
        assert any(name in m for m in messages), name
    assert_no_secrets(caplog.text, [database.password, new])


def test_new_version_with_the_same_login_does_not_swap(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    engine = _engine(secret_app)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string())
    results = runtime.watcher.check_once()  # type: ignore[union-attr]
    assert results[0].outcome == "unchanged"
    assert _engine(secret_app) is engine
    assert runtime.watcher.check_once()[0].change == "unchanged"  # type: ignore[union-attr]


def test_rotation_window_is_bridged_by_awspending(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    runtime = get_runtime(secret_app)
    channel = _post_channel(secret_app, "window")
    new = new_password()

    def inside_window() -> None:
        assert database.cluster.terminate_backends(database.role) >= 1
        client = secret_app.test_client()
        for i in range(5):  # every request needs a new connection now, and succeeds
            r = client.post(f"/api/channels/{channel}/messages", json={"body": f"in window {i}"})
            assert r.status_code == 201, r.json
        event = runtime.events.recent(1)[0]
        assert (event.trigger, event.outcome) == ("auth_failure", "rotated")

    version = rotate_secret(
        secretsmanager, secret, database.cluster, database.role, new, before_current=inside_window
    )

    assert runtime.rotator().current.version_id == version  # type: ignore[union-attr]
    engine = _engine(secret_app)
    assert runtime.watcher.check_once()[0].change == "unchanged"  # type: ignore[union-attr]
    assert _engine(secret_app) is engine  # settled on AWSCURRENT, no second swap
    assert secret_app.test_client().get("/readyz").status_code == 200
    assert_no_secrets(caplog.text, [database.password, new])


def test_transaction_open_across_a_swap_stays_on_one_backend(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    new = new_password()
    with secret_app.app_context():
        before = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        db.session.execute(sa.text("INSERT INTO channels (name, created_at) VALUES ('pinned', now())"))

        database.cluster.set_password(database.role, new)
        secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
        assert runtime.watcher.check_once()[0].outcome == "rotated"  # type: ignore[union-attr]
        assert runtime.rotator().draining, "the old engine drains while the transaction is open"

        after = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        db.session.commit()
        assert before == after
        next_txn = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        db.session.commit()
        assert next_txn != before  # the next transaction runs on the new engine
    wait_for(lambda: _drained(secret_app))
    with secret_app.app_context():
        assert (
            db.session.execute(sa.text("SELECT count(*) FROM channels WHERE name = 'pinned'")).scalar() == 1
        )


def test_connection_checked_out_past_the_grace_period_is_closed_when_returned(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, db_pool_grace_period_ms=200
    )
    app = make_app(settings, secrets_client=secretsmanager)
    runtime = get_runtime(app)
    old = _engine(app)
    conn = old.connect()
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    new = new_password()
    database.cluster.set_password(database.role, new)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
    assert runtime.watcher.check_once()[0].outcome == "rotated"
    wait_for(lambda: _drained(app))  # the grace period ended with the connection still out
    assert conn.exec_driver_sql("SELECT 1").scalar() == 1  # not killed
    conn.close()
    alive = database.cluster.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert alive[0][0] == 0


def test_failed_new_credentials_keep_the_old_engine_and_are_retried(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    engine = _engine(secret_app)
    new = new_password()
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))

    first = runtime.watcher.check_once()  # type: ignore[union-attr]
    assert first[0].outcome == "failed"
    assert _engine(secret_app) is engine
    event = runtime.events.recent(1)[0]
    assert event.outcome == "failed"
    assert event.error == "OperationalError:28P01"
    _post_channel(secret_app, "still-serving")

    database.cluster.set_password(database.role, new)  # the database catches up
    second = runtime.watcher.check_once()  # type: ignore[union-attr]
    assert second[0].outcome == "rotated"  # a plain poller would wait for the next rotation
    assert _engine(secret_app) is not engine


@pytest.mark.parametrize(
    ("secret_string", "error"),
    [
        (json.dumps({"username": "x"}), "InvalidSecret"),
        ("not json at all", "InvalidSecret"),
        (json.dumps(["username", "password"]), "InvalidSecret"),
    ],
)
def test_malformed_secret_is_recorded_and_survived(
    secret_app: Flask, secretsmanager: Any, secret: str, secret_string: str, error: str, caplog: Any
) -> None:
    runtime = get_runtime(secret_app)
    engine = _engine(secret_app)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=secret_string)
    assert runtime.watcher.check_once()[0].outcome == "failed"  # type: ignore[union-attr]
    assert runtime.events.recent(1)[0].error == error
    assert _engine(secret_app) is engine
    _post_channel(secret_app, "survived")
    assert "not json at all" not in caplog.text


def test_secrets_manager_outage_is_survived(database: Database, make_app: Any, caplog: Any) -> None:
    import boto3
    from botocore.config import Config

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "secretsmanager",
            region_name="us-east-1",
            endpoint_url=f"http://127.0.0.1:{port}",
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
        )
        arn = client.create_secret(Name="outage", SecretString=database.secret_string())["ARN"]
        settings = database.settings(
            db_secret_id=arn, postgres_user=None, postgres_password=None, db_secret_refresh_interval_ms=3000
        )
        app = make_app(settings, secrets_client=client)
        watcher = get_runtime(app).watcher
        server.stop()

        results = watcher.check_once()
        assert results[0].change == "error"
        assert results[0].error
        assert watcher.consecutive_failures == 1
        assert watcher.next_delay_s() == 1.0
        watcher.check_once()
        assert watcher.next_delay_s() == 2.0
        watcher.check_once()
        assert watcher.next_delay_s() == 3.0  # exponential, capped at the interval
        _post_channel(app, "during-outage")

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        new = new_password()
        database.cluster.set_password(database.role, new)
        client.put_secret_value(SecretId=arn, SecretString=database.secret_string(new))
        assert watcher.check_once()[0].outcome == "rotated"
        assert watcher.consecutive_failures == 0
        assert 2.7 <= watcher.next_delay_s() <= 3.3
    finally:
        server.stop()
    assert "secret_check_failed" in caplog.text


def test_startup_without_secrets_manager_falls_back_to_env(database: Database, make_app: Any) -> None:
    import boto3

    client = boto3.client(
        "secretsmanager", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    settings = database.settings(db_secret_id="arn:missing")
    app = make_app(settings, secrets_client=client)
    runtime = get_runtime(app)
    assert runtime.rotator().current is None  # nothing read yet: the watcher keeps trying
    assert runtime.events.recent(1)[0].trigger == "startup"
    assert app.test_client().get("/readyz").status_code == 200
    _post_channel(app, "on-env-credentials")


def test_many_concurrent_auth_failures_cost_a_handful_of_calls(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    runtime = get_runtime(secret_app)
    source = runtime.rotator().source
    assert isinstance(source, SecretsManagerSource)
    channel = _post_channel(secret_app, "burst")
    statuses: list[int] = []

    def inside_window() -> None:
        database.cluster.terminate_backends(database.role)
        before = dict(source.calls)
        start = threading.Barrier(20)

        def hit() -> None:
            start.wait(5)
            r = secret_app.test_client().post(f"/api/channels/{channel}/messages", json={"body": "burst"})
            statuses.append(r.status_code)

        threads = [threading.Thread(target=hit) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        fetched = source.calls["GetSecretValue"] - before["GetSecretValue"]
        assert 1 <= fetched <= 4, fetched

    rotate_secret(
        secretsmanager, secret, database.cluster, database.role, new_password(), before_current=inside_window
    )
    assert statuses == [201] * 20


def test_env_credentials_mean_no_watcher(app: Flask, caplog: Any) -> None:
    runtime = get_runtime(app)
    assert runtime.watcher is None
    assert runtime.rotator().source.name == "static"


def test_a_replica_secret_must_name_its_host_unless_the_host_is_pinned() -> None:
    """Without 'host', a replica's own secret would send "replica" reads to the primary's host."""
    base = Settings(postgres_host="primary.internal", db_secret_id="primary", db_replica_secret_id="replica")
    own = replica_rotation_settings(base)
    assert own is not None
    without_host = json.dumps({"username": "commng_ro", "password": "pw-not-logged"})
    with pytest.raises(InvalidSecret, match="'host'") as raised:
        parse_secret(without_host, own)
    assert "pw-not-logged" not in str(raised.value)
    with_host = json.dumps({"username": "commng_ro", "password": "x", "host": "replica.internal"})
    assert parse_secret(with_host, own).host == "replica.internal"
    pinned = replica_rotation_settings(replace(base, postgres_replica_host="reader.internal"))
    assert pinned is not None
    assert parse_secret(without_host, pinned).host == "reader.internal"
    shared = replica_rotation_settings(replace(base, db_replica_secret_id=None, postgres_replica_host="r"))
    assert shared is not None
    assert parse_secret(json.dumps({"username": "u", "password": "p", "host": "primary"}), shared).host == "r"
