"""Edges of the refresh found in review: a failing new AWSCURRENT, a killed leader, fast rotations."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from greenlet import GreenletExit

from commng_rotation import Trigger, get_runtime, rotator
from commng_rotation.credentials import AWSCURRENT, AWSPENDING
from devstack import new_password
from tests.helpers import Database, wait_for


def _versions(secretsmanager: Any, secret: str) -> dict[str, list[str]]:
    described = secretsmanager.describe_secret(SecretId=secret)["VersionIdsToStages"]
    return {
        stage: [v for v, stages in described.items() if stage in stages] for stage in (AWSCURRENT, AWSPENDING)
    }


def test_a_failing_new_awscurrent_is_remembered_after_adopting_awspending(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str
) -> None:
    """AWSCURRENT moved to a login that fails too; AWSPENDING works: polls then leave it be."""
    runtime = get_runtime(secret_app)
    failing, working = new_password(), new_password()
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(failing))
    secretsmanager.put_secret_value(
        SecretId=secret, SecretString=database.secret_string(working), VersionStages=[AWSPENDING]
    )
    database.cluster.set_password(database.role, working)
    failing_version = _versions(secretsmanager, secret)[AWSCURRENT][0]
    runtime.rotator().active.engine.dispose()  # type: ignore[union-attr]  # the next login is a new one

    with secret_app.app_context():
        assert secret_app.test_client().get("/api/channels").status_code == 200
    event = runtime.events.recent(1)[0]
    assert (event.trigger, event.outcome) == ("auth_failure", "rotated")
    assert runtime.rotator().current.stage == AWSPENDING  # type: ignore[union-attr]

    before = len(runtime.events.recent(100))
    results = runtime.watcher.check_once()  # type: ignore[union-attr]
    assert [r.change for r in results] == ["unchanged"]
    assert len(runtime.events.recent(100)) == before, "the poll retried the version known to fail"
    assert _versions(secretsmanager, secret)[AWSCURRENT] == [failing_version]


def test_a_refresh_killed_by_greenletexit_disposes_its_candidate_and_tells_joiners(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = get_runtime(secret_app)
    r = runtime.rotator()
    new = new_password()
    database.cluster.set_password(database.role, new)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
    seen: list[tuple[sa.Engine, Any, Any]] = []

    def killed_probe(engine: sa.Engine, timeout_s: float) -> None:
        engine.connect().close()  # the candidate holds a real connection when the kill lands
        seen.append((engine, engine.pool, r._refreshes.flight))
        raise GreenletExit

    monkeypatch.setattr(rotator, "probe", killed_probe)
    backends = database.backends()
    with pytest.raises(GreenletExit):
        r.refresh(Trigger.POLL)

    engine, pool, flight = seen[0]
    assert engine.pool is not pool, "the candidate's pool was not disposed"
    wait_for(lambda: database.backends() < backends + 1)
    assert flight.done.is_set()
    assert flight.result is not None
    assert (flight.result.outcome, flight.result.error) == ("failed", "GreenletExit")
    assert r.active is not None
    assert r.active.engine is not engine


def test_rotations_faster_than_the_grace_period_keep_at_most_the_cap_draining(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, db_pool_grace_period_ms=60_000
    )
    app = make_app(settings, secrets_client=secretsmanager)
    r = get_runtime(app).rotator()
    held = []
    for _ in range(rotator.MAX_DRAINING + 2):
        assert r.active is not None
        held.append(r.active.engine.connect())  # keeps the old pool from draining
        new = new_password()
        database.cluster.set_password(database.role, new)
        secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
        assert get_runtime(app).watcher.check_once()[0].outcome == "rotated"  # type: ignore[union-attr]
        assert len(r.draining) <= rotator.MAX_DRAINING
    closed_early = [c for c in held[:2] if c.engine not in {m.engine for m in r.draining}]
    assert len(closed_early) == 2
    for conn in held:
        conn.close()
    # A connection returned to a pool closed early is closed, not kept.
    wait_for(lambda: database.backends() <= 1 + rotator.MAX_DRAINING)


def test_a_rotation_that_finishes_between_the_two_reads_is_adopted_from_awscurrent(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused login; AWSCURRENT still old when read; then AWSCURRENT moves and AWSPENDING goes.

    The refresh used to read AWSPENDING next, find it gone, fail, and answer 503.
    """
    runtime = get_runtime(secret_app)
    r = runtime.rotator()
    new = new_password()
    old_version = _versions(secretsmanager, secret)[AWSCURRENT][0]
    pending = secretsmanager.put_secret_value(
        SecretId=secret, SecretString=database.secret_string(new), VersionStages=[AWSPENDING]
    )["VersionId"]
    database.cluster.set_password(database.role, new)
    fetch = r.source.fetch
    stages: list[str] = []

    def fetch_then_finish(stage: str = AWSCURRENT) -> Any:
        stages.append(stage)
        got = fetch(stage)
        if stages == [AWSCURRENT]:  # Secrets Manager's finishSecret lands right after our read
            secretsmanager.update_secret_version_stage(
                SecretId=secret,
                VersionStage=AWSCURRENT,
                MoveToVersionId=pending,
                RemoveFromVersionId=old_version,
            )
            secretsmanager.update_secret_version_stage(
                SecretId=secret, VersionStage=AWSPENDING, RemoveFromVersionId=pending
            )
        return got

    monkeypatch.setattr(r.source, "fetch", fetch_then_finish)
    r.active.engine.dispose()  # type: ignore[union-attr]  # the next login is a new one

    with secret_app.app_context():
        assert secret_app.test_client().get("/api/channels").status_code == 200
    assert stages == [AWSCURRENT, AWSPENDING, AWSCURRENT]
    event = runtime.events.recent(1)[0]
    assert (event.trigger, event.outcome, event.new_version) == ("auth_failure", "rotated", pending)
    assert r.current is not None
    assert (r.current.stage, r.current.version_id) == (AWSCURRENT, pending)
