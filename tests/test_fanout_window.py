"""An announcement heard in the rotation window does not swallow the push that ends it."""

from __future__ import annotations

from typing import Any

import boto3
from flask import Flask

from commng_rotation import Trigger
from commng_rotation.credentials import AWSPENDING
from commng_rotation.runtime import get_runtime
from devstack import new_password, rotate_secret
from devstack.events import create_rotation_queue, send_rotation_event
from tests.helpers import Database, wait_for
from tests.test_fanout import _fanout, _version


def test_a_push_after_the_window_reaches_a_worker_that_checked_the_pending_version(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    """Worker A adopts AWSPENDING in the window and announces it; B checks, AWSCURRENT is
    still old. AWSCURRENT then moves; the push reaches A, which relays it: B must adopt."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = create_rotation_queue(sqs)
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, db_rotation_queue_url=url
    )
    first: Flask = make_app(settings, secrets_client=secretsmanager, sqs_client=sqs)
    second: Flask = make_app(settings, secrets_client=secretsmanager, sqs_client=sqs)
    a, b = get_runtime(first), get_runtime(second)
    assert b.fleet is not None
    b.fleet.stop()  # its writes would open new connections in B: a login refused, a refresh
    listener = _fanout(b)
    answers: list[str] = []
    handle = listener.handle

    def recorded(payload: str) -> str:
        answers.append(handle(payload))
        return answers[-1]

    listener.handle = recorded  # type: ignore[method-assign]
    listener.start()
    wait_for(lambda: listener.connected, timeout_s=10)
    old = _version(b)

    def in_the_window() -> None:
        rotator = a.rotator()
        assert rotator.credentials is not None
        assert rotator.on_auth_failure(rotator.credentials) is not None  # a refused login in A
        assert rotator.current is not None
        assert rotator.current.stage == AWSPENDING
        pending = rotator.current.version_id
        # B heard A's announcement and checked: AWSCURRENT did not hold it yet.
        wait_for(lambda: (None, pending) in listener._unchanged, timeout_s=10)
        assert _version(b) == old

    version = rotate_secret(
        secretsmanager, secret, database.cluster, database.role, new_password(), before_current=in_the_window
    )
    assert _version(a) == version
    send_rotation_event(sqs, url, secret, version)

    assert a.push is not None
    (handled,) = a.push.poll_once(wait_s=1)  # SQS gives the event to one worker: A
    assert handled.checked

    wait_for(lambda: len(answers) == 2, timeout_s=10)
    assert answers == ["checked", "checked"], "the relayed push was taken for the window's announcement"
    wait_for(lambda: _version(b) == version, timeout_s=10)
    event = b.events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == (Trigger.NOTIFY, "rotated", version)
