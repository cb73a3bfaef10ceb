"""Secrets Manager's alternating-users rotation, against real roles and moto.

Each rotation puts the *other* user (``app_n`` / ``app_n_clone``) with a new password in
AWSPENDING, changes that user's password only, and moves AWSCURRENT: so the login the app
uses now keeps working through the rotation, and its password changes one rotation later,
while connections opened with it may still be open.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from psycopg2 import sql

from commng.app import rotation_settings
from commng.db import db
from commng_rotation.engines import EngineFactory
from commng_rotation.runtime import get_runtime
from config import load_settings
from devstack import new_password, rotate_alternating
from tests.helpers import Database, assert_no_secrets, wait_for


@pytest.fixture
def clone(database: Database) -> Iterator[str]:
    """``<role>_clone``, a login granted the app role, as AWS's rotation function makes it."""
    name = f"{database.role}_clone"
    database.cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(name), sql.Identifier(database.role))
    )
    yield name
    database.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


class StageRecorder:
    """The real (moto) client, noting the stage of every GetSecretValue."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.stages: list[str | None] = []

    def get_secret_value(self, **kwargs: Any) -> Any:
        self.stages.append(kwargs.get("VersionStage"))
        return self.client.get_secret_value(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def _current_user(app: Flask) -> str:
    with app.app_context():
        try:
            return str(db.session.execute(sa.text("SELECT current_user")).scalar())
        finally:
            db.session.remove()


def _post(app: Flask, path: str, body: dict[str, Any]) -> int:
    response = app.test_client().post(path, json=body)
    assert response.status_code == 201, response.json
    created: int = response.json["id"]
    return created


def _backends(database: Database, user: str) -> int:
    return database.cluster.backend_count(user)


def test_three_alternating_rotations_while_an_old_connection_is_held(
    database: Database, clone: str, secretsmanager: Any, secret: str, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    settings = database.settings(
        db_secret_id=secret,
        postgres_user=None,
        postgres_password=None,
        # Long enough that the first pool is still draining, with the held connection
        # checked out, when the password it logged in with changes (rotation 2).
        db_pool_grace_period_ms=60_000,
        # Fan-out's LISTEN connection is one more backend per user; this test counts them.
        db_rotation_fanout=False,
    )
    app = make_app(settings, secrets_client=secretsmanager)
    runtime = get_runtime(app)
    runtime.start()  # the watcher polls every second, as in a worker
    channel = _post(app, "/api/channels", {"name": "alternating"})
    assert _current_user(app) == database.role
    with app.app_context():
        held = db.engine.connect()
    assert held.exec_driver_sql("SELECT current_user").scalar() == database.role

    passwords = [database.password]
    users = []
    for n in range(3):
        password = new_password()
        passwords.append(password)
        version, user = rotate_alternating(secretsmanager, secret, database.cluster, password)
        users.append(user)
        wait_for(lambda v=version: (c := runtime.rotator().current) is not None and c.version_id == v)
        assert _current_user(app) == user
        _post(app, f"/api/channels/{channel}/messages", {"body": f"after rotation {n + 1}"})
        assert app.test_client().get(f"/api/channels/{channel}/messages").status_code == 200
        # Opened before the first rotation as app_n, whose password rotation 2 changed.
        assert held.exec_driver_sql("SELECT count(*) FROM channels").scalar() == 1

    assert users == [clone, database.role, clone]
    assert [e.outcome for e in runtime.events.recent(10) if e.trigger == "poll"] == ["rotated"] * 3
    # The held connection is closed when returned; nothing is left open as app_n.
    held.close()
    wait_for(lambda: _backends(database, database.role) == 0, timeout_s=15)
    assert _backends(database, clone) >= 1
    response = app.test_client().get(f"/api/channels/{channel}/messages")
    assert [m["body"] for m in response.json["messages"]][:1] == ["after rotation 3"]
    assert_no_secrets(caplog.text, passwords)


def test_a_refused_login_moves_to_awscurrent_without_reading_awspending(
    database: Database, clone: str, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    recorder = StageRecorder(secretsmanager)
    settings = database.settings(db_secret_id=secret, postgres_user=None, postgres_password=None)
    app = make_app(settings, secrets_client=recorder)
    channel = _post(app, "/api/channels", {"name": "flip"})
    # Rotation 1 completes unnoticed (no watcher runs): AWSCURRENT holds the clone, and
    # the app still logs in as app_n, which kept its password.
    version, user = rotate_alternating(secretsmanager, secret, database.cluster, new_password())
    assert user == clone
    # Rotation 2 is under way: app_n's password changed, AWSPENDING holds it, and
    # AWSCURRENT (the clone) has not moved. Every connection of app_n must log in anew.
    pending = new_password()
    secretsmanager.put_secret_value(
        SecretId=secret,
        ClientRequestToken="b" * 32,
        SecretString=json.dumps({"username": database.role, "password": pending}),
        VersionStages=["AWSPENDING"],
    )
    database.cluster.set_password(database.role, pending)
    database.cluster.terminate_backends(database.role)
    recorder.stages.clear()

    _post(app, f"/api/channels/{channel}/messages", {"body": "after the flip"})

    event = get_runtime(app).events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == ("auth_failure", "rotated", version)
    assert recorder.stages == ["AWSCURRENT"]
    assert _current_user(app) == clone


def test_pool_recycle_is_the_rotation_period() -> None:
    env = {"POSTGRES_USER": "u"}
    default = EngineFactory(rotation_settings(load_settings(env))).options()
    assert default["pool_recycle"] == 7 * 24 * 3600
    hourly = rotation_settings(load_settings({**env, "DB_ROTATION_PERIOD_S": "3600"}))
    assert hourly.rotation_period_s == 3600
    assert EngineFactory(hourly).options()["pool_recycle"] == 3600
