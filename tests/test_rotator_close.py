"""After close() (worker shutdown), a refresh still running installs nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask

from commng.db import db
from commng_rotation import Trigger, get_runtime
from commng_rotation.credentials import AWSCURRENT
from devstack import new_password
from tests.helpers import Database, wait_for


def test_a_refresh_that_outlives_close_installs_no_engine(
    secret_app: Flask, database: Database, secretsmanager: Any, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = get_runtime(secret_app)
    r = runtime.rotator()
    new = new_password()
    database.cluster.set_password(database.role, new)
    secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
    gate = threading.Event()  # Secrets Manager answers once the test opens it
    asked = threading.Event()
    fetch = r.source.fetch

    def slow_fetch(stage: str = AWSCURRENT) -> Any:
        asked.set()
        gate.wait(30)
        return fetch(stage)

    monkeypatch.setattr(r.source, "fetch", slow_fetch)
    results: list[Any] = []
    # A check that the watcher's bounded join gave up on, or a refresh a request started.
    refresh = threading.Thread(target=lambda: results.append(r.refresh(Trigger.POLL)), daemon=True)
    refresh.start()
    try:
        assert asked.wait(10)
        r.close()
        assert r.active is not None
        closed = r.active.engine
    finally:
        gate.set()
    refresh.join(15)
    assert not refresh.is_alive()

    assert r.active.engine is closed, "an engine was installed after close()"
    assert results[0].outcome == "failed"
    assert r.active.retired
    with secret_app.app_context():
        assert db.engine is closed
    wait_for(lambda: database.backends() == 0)  # the refresh's tested engine is closed too
