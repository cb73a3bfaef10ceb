"""Two services on one database: each sees only its own history and fleet, and each hears only
its own workers' announcements (its own LISTEN/NOTIFY channel, derived from its service).

CommNG (service ``commng``) and an adopter (service ``notes``), two workers each, on one
database with two logins and two secrets, real PostgreSQL and moto. Each secret rotates
once; in each service, the worker that polls tells its sibling, and the other service
hears nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from psycopg2 import sql
from sqlalchemy.orm import DeclarativeBase

import commng_rotation as rotation
from commng_rotation import PinnedSession, RotationSettings, Runtime, Trigger
from devstack import new_password, rotate_secret
from tests.helpers import OWNER_ROLE, Database, assert_no_secrets, wait_for


class _Base(DeclarativeBase):
    pass


@dataclass
class Service:
    name: str
    role: str
    secret: str
    workers: tuple[Runtime, Runtime]

    def version(self, worker: int) -> str | None:
        current = self.workers[worker].rotator().current
        return current.version_id if current else None


@pytest.fixture
def notes_role(database: Database) -> Iterator[tuple[str, str]]:
    """A second login on the test database, for the second service."""
    role, password = f"{database.role}_notes", new_password()
    cluster = database.cluster
    cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
    )
    cluster.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(OWNER_ROLE), sql.Identifier(role)))
    yield role, password
    cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _notes_app(database: Database, secret: str, secretsmanager: Any) -> Flask:
    db = SQLAlchemy(model_class=_Base, session_options={"class_": PinnedSession})
    app = Flask("notes")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    settings = RotationSettings(
        secret_id=secret,
        host="127.0.0.1",
        port=database.cluster.port,
        dbname=database.name,
        sslmode="disable",
        pool_size=2,
        grace_period_s=0.5,
        application_name="notes",
    )
    rotation.init_app(app, db, settings, secrets_client=secretsmanager)
    return app


@pytest.fixture
def services(
    database: Database, secretsmanager: Any, secret: str, make_app: Any, notes_role: tuple[str, str]
) -> Iterator[tuple[Service, Service]]:
    settings = database.settings(db_secret_id=secret, postgres_user=None, postgres_password=None)
    commng = [rotation.get_runtime(make_app(settings, secrets_client=secretsmanager)) for _ in range(2)]
    role, password = notes_role
    login = json.dumps({"username": role, "password": password})
    notes_secret = secretsmanager.create_secret(Name=f"db/{database.name}/notes", SecretString=login)["ARN"]
    notes = [rotation.get_runtime(_notes_app(database, notes_secret, secretsmanager)) for _ in range(2)]
    pair = (
        Service("commng", database.role, secret, (commng[0], commng[1])),
        Service("notes", role, notes_secret, (notes[0], notes[1])),
    )
    try:
        for service in pair:
            listener = service.workers[1].fanout
            assert listener is not None
            listener.start()
            wait_for(lambda listener=listener: listener.connected, timeout_s=10)
        yield pair
    finally:
        for runtime in notes:
            runtime.stop()


def test_two_services_on_one_database_keep_to_their_own(
    services: tuple[Service, Service], database: Database, secretsmanager: Any, caplog: Any
) -> None:
    commng, notes = services
    assert [s.workers[0].fanout.channel for s in services] == ["commng_rotation", "notes_rotation"]  # type: ignore[union-attr]
    passwords = []
    for service, other in ((commng, notes), (notes, commng)):
        heard_before = other.workers[1].fanout.received  # type: ignore[union-attr]
        password = new_password()
        passwords.append(password)
        version = rotate_secret(secretsmanager, service.secret, database.cluster, service.role, password)
        service.workers[0].watcher.check_once()  # type: ignore[union-attr]
        # The sibling learns from its own service's channel...
        wait_for(lambda service=service, version=version: service.version(1) == version, timeout_s=10)
        event = service.workers[1].events.recent(1)[0]
        assert (event.trigger, event.new_version) == (Trigger.NOTIFY, version)
        # ...and the other service hears nothing of it.
        assert other.workers[1].fanout.received == heard_before  # type: ignore[union-attr]
        assert other.version(1) != version

    for service in services:
        for runtime in service.workers:
            assert runtime.history.flush()
            assert runtime.fleet is not None
            assert runtime.fleet.report_once()
    engine = commng.workers[0].rotator().active.engine  # type: ignore[union-attr]
    with engine.connect() as conn:
        for service in services:
            rows, _ = rotation.list_events(conn, 100, service=service.name)
            assert rows
            assert {r.service for r in rows} == {service.name}
            assert {(r.trigger, r.outcome) for r in rows} >= {("poll", "rotated"), ("notify", "rotated")}
            counts = rotation.count_by_trigger(conn, service=service.name)
            assert counts["notify"]["rotated"] == 1
            workers = rotation.list_workers(conn, timedelta(minutes=5), service=service.name)
            assert {w.service for w in workers} == {service.name}
            assert len(workers) == 1  # the app objects of one process share its host:pid name
            timeline = rotation.recent_rotations(conn, service=service.name)
            versions = {row["new_version"] for row in timeline}
            assert versions == {service.version(0)}
        everyone, _ = rotation.list_events(conn, 100)
        assert {r.service for r in everyone} == {"commng", "notes"}
    assert_no_secrets(caplog.text, [database.password, *passwords])
