"""Push: the secret's EventBridge events on SQS (moto) start a check at once; gunicorn end to end."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from flask import Flask
from psycopg2 import sql

from commng_rotation import Trigger
from commng_rotation.push import PushConsumer, QueueUnavailable, SecretMatcher, classify
from commng_rotation.runtime import get_runtime
from devstack import free_port, new_password, rotate_secret
from devstack.events import cloudtrail_event, create_rotation_queue, label_updated_event, send_rotation_event
from devstack.processes import GunicornServer
from tests.helpers import Database, assert_no_secrets, wait_for

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db/main-AbC123"


@pytest.fixture
def queue(secretsmanager: Any) -> tuple[Any, str]:
    """An SQS client and queue in the same in-process moto as the secret."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    return sqs, create_rotation_queue(sqs)


@pytest.fixture
def push_app(
    database: Database, secretsmanager: Any, secret: str, queue: tuple[Any, str], make_app: Any
) -> Flask:
    sqs, url = queue
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, db_rotation_queue_url=url
    )
    app: Flask = make_app(settings, secrets_client=secretsmanager, sqs_client=sqs)
    return app


def _left(sqs: Any, url: str) -> int:
    """Messages still on the queue, visible or in flight."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[n]) for n in names)


def _push(app: Flask) -> PushConsumer:
    push = get_runtime(app).push
    assert push is not None
    return push


def test_events_are_classified_by_secret_label_and_source() -> None:
    by_arn = SecretMatcher(ARN)
    by_name = SecretMatcher("db/main")
    event = json.dumps(label_updated_event(ARN, "v2"))
    assert classify(event, by_arn) == ("label_updated", "Secret Label Updated", None, "v2")
    assert classify(event, by_name)[0] == "label_updated"  # detail.name and the ARN's name
    other = label_updated_event(ARN.replace("db/main", "db/other"), "v2")
    assert classify(json.dumps(other), by_arn)[2] == "other_secret"
    staging = json.dumps(label_updated_event(ARN, "v2", label="STAGING"))
    assert classify(staging, by_arn)[2] == "other_label"
    failed = cloudtrail_event(ARN, "RotationFailed")
    assert classify(json.dumps(failed), by_arn)[:2] == ("rotation_failed", "RotationFailed")
    # Some sources carry the secret in serviceEventDetails rather than additionalEventData.
    failed["detail"]["serviceEventDetails"] = failed["detail"].pop("additionalEventData")
    assert classify(json.dumps(failed), by_name)[0] == "rotation_failed"
    succeeded = json.dumps(cloudtrail_event(ARN, "RotationSucceeded"))
    assert classify(succeeded, by_arn)[0] == "rotation_succeeded"
    assert classify(json.dumps(cloudtrail_event(ARN, "GetSecretValue")), by_arn)[2] == "other_event"
    for junk in ["", "not json", "[1]", '{"detail-type": 5}', '{"detail-type": "x", "detail": []}']:
        assert classify(junk, by_arn)[::2] == ("ignored", "malformed"), junk


def test_a_label_updated_event_adopts_at_once_with_trigger_push_and_is_deleted(
    push_app: Flask, database: Database, secretsmanager: Any, secret: str, queue: tuple[Any, str]
) -> None:
    sqs, url = queue
    runtime = get_runtime(push_app)
    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, new_password())
    send_rotation_event(sqs, url, secret, version)

    handled = _push(push_app).poll_once(wait_s=1)

    assert [(h.kind, h.version, h.checked, h.deleted) for h in handled] == [
        ("label_updated", version, True, True)
    ]
    event = runtime.events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == (Trigger.PUSH, "rotated", version)
    assert runtime.rotator().current.version_id == version  # type: ignore[union-attr]
    assert _left(sqs, url) == 0


def test_with_fan_out_off_push_still_adopts_at_once_and_nothing_listens(
    database: Database, secretsmanager: Any, secret: str, queue: tuple[Any, str], make_app: Any
) -> None:
    """DB_ROTATION_FANOUT=false, the shape behind RDS Proxy (a LISTEN session pins a proxy
    connection): the worker that receives the event still adopts at once; the others follow
    on their next poll or their first refused login (docs/deployment-shapes.md)."""
    sqs, url = queue
    settings = database.settings(
        db_secret_id=secret,
        postgres_user=None,
        postgres_password=None,
        db_rotation_queue_url=url,
        db_rotation_fanout=False,
    )
    app = make_app(settings, secrets_client=secretsmanager, sqs_client=sqs)
    runtime = get_runtime(app)
    assert runtime.fanout is None
    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, new_password())
    send_rotation_event(sqs, url, secret, version)

    handled = _push(app).poll_once(wait_s=1)

    assert [(h.kind, h.version, h.checked, h.deleted) for h in handled] == [
        ("label_updated", version, True, True)
    ]
    assert runtime.rotator().current.version_id == version  # type: ignore[union-attr]
    with app.test_client() as client:
        assert client.get("/api/channels").status_code == 200  # served on the new login
    listening = database.cluster.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND query ILIKE 'LISTEN%%'",
        (database.role,),
    )
    assert listening == [(0,)]


def test_other_secrets_and_malformed_bodies_are_logged_by_name_and_deleted(
    push_app: Flask, secret: str, queue: tuple[Any, str], caplog: Any
) -> None:
    sqs, url = queue
    other = secret.replace(":secret:db/", ":secret:elsewhere/")
    bodies = [
        json.dumps(label_updated_event(other, "v9")),
        json.dumps(label_updated_event(secret, "v9", label="STAGING")),
        "{not json at all MARKER-7f3a",
        json.dumps({"detail-type": "Something Else", "detail": {"x": "MARKER-7f3a"}}),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    caplog.set_level(logging.INFO)
    runtime = get_runtime(push_app)

    handled = []
    wait_for(lambda: handled.extend(_push(push_app).poll_once(wait_s=0)) or len(handled) == 4, timeout_s=10)

    assert sorted(h.reason or "" for h in handled) == [
        "malformed",
        "other_event",
        "other_label",
        "other_secret",
    ]
    assert all(h.deleted and not h.checked for h in handled)
    assert runtime.watcher is not None
    assert runtime.watcher.last_check_at is None
    assert _left(sqs, url) == 0
    assert caplog.text.count("rotation_event_ignored") == 4
    assert "Something Else" in caplog.text  # the event's name is logged ...
    assert "MARKER-7f3a" not in caplog.text  # ... never its body


def test_rotation_failed_upstream_is_an_error_and_told_to_listeners(
    push_app: Flask, secret: str, queue: tuple[Any, str], caplog: Any
) -> None:
    sqs, url = queue
    told: list[str] = []
    _push(push_app).upstream_failure_listeners.append(told.append)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(cloudtrail_event(secret, "RotationFailed")))
    caplog.set_level(logging.INFO)

    (handled,) = _push(push_app).poll_once(wait_s=1)

    assert (handled.kind, handled.checked, handled.deleted) == ("rotation_failed", False, True)
    assert told == ["RotationFailed"]
    failed = [r for r in caplog.records if "rotation_failed_upstream" in r.getMessage()]
    assert failed
    assert failed[0].levelno == logging.ERROR
    from commng.observability import metrics  # the metrics hook counts it by event name

    assert metrics.UPSTREAM_FAILURES.labels("RotationFailed")._value.get() >= 1


def test_a_push_for_a_version_already_in_use_is_relayed_to_the_fleet(
    push_app: Flask, database: Database, secretsmanager: Any, secret: str, queue: tuple[Any, str]
) -> None:
    sqs, url = queue
    runtime = get_runtime(push_app)
    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, new_password())
    runtime.watcher.check_once()  # type: ignore[union-attr]  # adopted by the poll first
    relayed: list[tuple[str | None, str]] = []
    _push(push_app).relay_listeners[:] = [lambda bind, v: relayed.append((bind, v))]
    send_rotation_event(sqs, url, secret, version)

    (handled,) = _push(push_app).poll_once(wait_s=1)

    assert handled.checked
    assert handled.deleted
    assert relayed == [(None, version)]


def test_sqs_failures_back_off_and_never_end_the_loop(push_app: Flask, queue: tuple[Any, str]) -> None:
    sqs, url = queue
    runtime = get_runtime(push_app)
    assert runtime.watcher is not None
    missing = url.rsplit("/", 1)[0] + "/no-such-queue"
    push = PushConsumer(sqs, missing, "db/x", runtime.watcher, wait_s=0)
    with pytest.raises(QueueUnavailable) as raised:
        push.poll_once()
    assert "QueueDoesNotExist" in raised.value.code or "NonExistentQueue" in raised.value.code
    push.start()
    try:
        wait_for(lambda: push.consecutive_failures >= 2, timeout_s=10)  # 1 s, then 2 s later
        assert push.running
    finally:
        started = time.monotonic()
        push.stop()
    assert not push.running
    assert time.monotonic() - started < 3


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture
def sqs_endpoint(moto_endpoint: str) -> Iterator[tuple[Any, str]]:
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=moto_endpoint)
    return sqs, create_rotation_queue(sqs)


def _refreshes(server: GunicornServer, version: str) -> dict[int, str]:
    """pid -> trigger of the workers that logged adopting ``version``."""
    found = {}
    for line in server.output().splitlines():
        if '"refresh_succeeded"' in line:
            record = json.loads(line)
            if record.get("new_version") == version:
                found[record["pid"]] = record["trigger"]
    return found


@pytest.mark.e2e
def test_gunicorn_push_reaches_one_worker_and_fan_out_the_other(
    database: Database, moto_endpoint: str, sqs_endpoint: tuple[Any, str], workdir: Path
) -> None:
    sqs, url = sqs_endpoint
    client, arn, env = database.watched_env(
        moto_endpoint, workdir, DB_ROTATION_QUEUE_URL=url, AWS_ENDPOINT_URL_SQS=moto_endpoint
    )
    env["DB_SECRET_REFRESH_INTERVAL_MS"] = "600000"  # the poll stays out of the way
    server = GunicornServer(env, free_port(), 2, workdir / "gunicorn.log", monitor_blocking=True)
    new = new_password()
    server.start()
    try:
        wait_for(lambda: server.output().count('"rotation_listener_connected"') >= 2, timeout_s=15)
        version = rotate_secret(client, arn, database.cluster, database.role, new, 0.5)
        sent = time.monotonic()
        send_rotation_event(sqs, url, arn, version)
        # How soon is the bench's to measure (`make bench`, fleet: push + fan-out); here, that
        # both workers adopt by the event (the poll is 10 minutes away), one by each path.
        wait_for(lambda: len(_refreshes(server, version)) == 2, timeout_s=20.0, interval_s=0.02)
        elapsed = time.monotonic() - sent
        print(f"event sent -> both workers on the new version: {elapsed * 1000:.0f} ms")
        assert sorted(_refreshes(server, version).values()) == ["notify", "push"], server.problems()
        wait_for(lambda: _left(sqs, url) == 0, timeout_s=5)
    finally:
        code = server.stop()
    assert code == 0
    assert_no_secrets(server.output(), [database.password, new])
    assert server.blocking_reports() == []


# -- a replica with its own secret (the primary stands in for the standby: the routing is tested) --


@pytest.fixture
def reader(database: Database) -> Iterator[tuple[str, str]]:
    """A login of its own for the replica bind, granted the app role; (name, password)."""
    name, password = f"{database.role}_reader", new_password()
    database.cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
            sql.Identifier(name), sql.Literal(password), sql.Identifier(database.role)
        )
    )
    yield name, password
    database.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _replica_settings(database: Database, secret: str, url: str, replica_secret: str | None = None) -> Any:
    """The primary on ``secret``, a replica bind at the same server on ``replica_secret`` (or ``secret``)."""
    return database.settings(
        db_secret_id=secret,
        postgres_user=None,
        postgres_password=None,
        db_rotation_queue_url=url,
        postgres_replica_host="127.0.0.1",
        postgres_replica_port=database.cluster.port,
        db_replica_secret_id=replica_secret,
    )


def _replica_secret(secretsmanager: Any, database: Database, reader: tuple[str, str]) -> str:
    name, password = reader
    login = json.dumps({"username": name, "password": password})
    arn: str = secretsmanager.create_secret(Name=f"replica/{database.name}", SecretString=login)["ARN"]
    return arn


def test_an_event_for_the_replica_secret_checks_the_replica_bind_only(
    database: Database,
    secretsmanager: Any,
    secret: str,
    queue: tuple[Any, str],
    make_app: Any,
    reader: tuple[str, str],
) -> None:
    sqs, url = queue
    replica_arn = _replica_secret(secretsmanager, database, reader)
    app = make_app(_replica_settings(database, secret, url, replica_arn), secrets_client=secretsmanager)
    runtime = get_runtime(app)
    primary_version = runtime.rotator().current.version_id  # type: ignore[union-attr]
    primary_calls = dict(runtime.rotator().source.calls)  # type: ignore[attr-defined]
    version = rotate_secret(secretsmanager, replica_arn, database.cluster, reader[0], new_password())
    send_rotation_event(sqs, url, replica_arn, version)

    (handled,) = _push(app).poll_once(wait_s=1)

    assert (handled.kind, handled.reason, handled.checked, handled.deleted) == (
        "label_updated",
        None,
        True,
        True,
    )
    assert handled.binds == ("replica",)
    assert runtime.rotator("replica").current.version_id == version  # type: ignore[union-attr]
    event = runtime.events.recent(1)[0]
    assert (event.bind, event.trigger, event.outcome, event.new_version) == (
        "replica",
        Trigger.PUSH,
        "rotated",
        version,
    )
    # Routed: the primary's secret was not asked, its engine not touched.
    assert runtime.rotator().source.calls == primary_calls  # type: ignore[attr-defined]
    assert runtime.rotator().current.version_id == primary_version  # type: ignore[union-attr]
    assert _left(sqs, url) == 0


def test_an_event_for_a_secret_the_primary_and_replica_share_checks_both(
    database: Database, secretsmanager: Any, secret: str, queue: tuple[Any, str], make_app: Any
) -> None:
    sqs, url = queue
    app = make_app(_replica_settings(database, secret, url), secrets_client=secretsmanager)
    runtime = get_runtime(app)
    version = rotate_secret(secretsmanager, secret, database.cluster, database.role, new_password())
    send_rotation_event(sqs, url, secret, version)

    (handled,) = _push(app).poll_once(wait_s=1)

    assert (handled.kind, handled.checked) == ("label_updated", True)
    assert handled.binds == (None, "replica")
    assert runtime.rotator().current.version_id == version  # type: ignore[union-attr]
    assert runtime.rotator("replica").current.version_id == version  # type: ignore[union-attr]
    adopted = {(e.bind, e.trigger) for e in runtime.events.recent(2)}
    assert adopted == {(None, Trigger.PUSH), ("replica", Trigger.PUSH)}


def test_a_replica_adoption_by_push_reaches_the_other_workers_by_notify_over_the_primary(
    database: Database,
    secretsmanager: Any,
    secret: str,
    queue: tuple[Any, str],
    make_app: Any,
    reader: tuple[str, str],
) -> None:
    sqs, url = queue
    replica_arn = _replica_secret(secretsmanager, database, reader)
    settings = _replica_settings(database, secret, url, replica_arn)
    first = get_runtime(make_app(settings, secrets_client=secretsmanager))
    second = get_runtime(make_app(settings, secrets_client=secretsmanager))
    listener = second.fanout
    assert listener is not None
    listener.start()
    wait_for(lambda: listener.connected, timeout_s=10)
    version = rotate_secret(secretsmanager, replica_arn, database.cluster, reader[0], new_password())
    send_rotation_event(sqs, url, replica_arn, version)

    (handled,) = first.push.poll_once(wait_s=1)  # type: ignore[union-attr]  # one worker gets the message

    assert (handled.checked, handled.binds) == (True, ("replica",))
    wait_for(lambda: second.rotator("replica").current.version_id == version, timeout_s=10)  # type: ignore[union-attr]
    event = next(e for e in second.events.recent(5) if e.bind == "replica" and e.outcome == "rotated")
    assert (event.trigger, event.new_version) == (Trigger.NOTIFY, version)
    assert first.fanout is not None
    wait_for(lambda: first.fanout.sent == 1, timeout_s=5)  # type: ignore[union-attr]
