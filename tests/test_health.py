"""Liveness and readiness against a PostgreSQL that stops, starts and refuses logins."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg2 import sql

from commng_rotation import get_runtime
from config import Settings
from devstack import PostgresCluster, new_password, running_cluster
from tests.helpers import Database, assert_no_secrets, wait_for


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster this test may stop and start without disturbing the others."""
    base = Path(tempfile.mkdtemp(prefix="commng-pg-own-"))
    try:
        with running_cluster(base) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_healthz_never_touches_the_database(make_app: Any) -> None:
    settings = Settings(postgres_host="127.0.0.1", postgres_port=1, postgres_user="x", postgres_password="y")
    client = make_app(settings).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503


def test_readyz_follows_the_database_down_and_back(own_cluster: PostgresCluster, make_app: Any) -> None:
    password = new_password()
    own_cluster.execute(sql.SQL("CREATE ROLE ready LOGIN PASSWORD {}").format(sql.Literal(password)))
    settings = Settings(
        postgres_host="127.0.0.1",
        postgres_port=own_cluster.port,
        postgres_db="postgres",
        postgres_user="ready",
        postgres_password=password,
        postgres_ssl="disable",
        postgres_connect_timeout_s=2,
    )
    client = make_app(settings).test_client()
    assert client.get("/readyz").json == {"status": "ready"}

    own_cluster.stop()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.json == {"status": "unavailable", "reason": "database unreachable"}
    assert client.get("/healthz").status_code == 200

    own_cluster.start()
    assert client.get("/readyz").status_code == 200
    assert_no_secrets(down.get_data(as_text=True), [password])


def test_readyz_is_503_when_the_login_stops_working(database: Database, make_app: Any) -> None:
    client = make_app(database.settings()).test_client()
    assert client.get("/readyz").status_code == 200
    database.cluster.set_password(database.role, new_password())  # nobody told the app
    database.cluster.terminate_backends(database.role)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["reason"] == "database authentication failed"
    api = client.get("/api/channels")
    assert api.status_code == 503
    assert api.json["error"]["code"] == "database_unavailable"
    assert_no_secrets(response.get_data(as_text=True) + api.get_data(as_text=True), [database.password])


def test_readyz_survives_a_pooled_connection_whose_backend_died(
    database: Database, make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation window that terminates idle backends: the pool hands out a dead one."""
    app = make_app(database.settings())
    client = app.test_client()
    assert client.get("/readyz").status_code == 200  # one idle connection in the pool now
    engine = get_runtime(app).rotator().active.engine  # type: ignore[union-attr]
    killed: list[int] = []

    def kill_after_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if not killed:  # the first checkout only: after the pre-ping, before SELECT 1
            with dbapi_connection.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pid = cur.fetchone()[0]
            database.cluster.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_for(
                lambda: not database.cluster.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
            )
            killed.append(pid)

    sa.event.listen(engine, "checkout", kill_after_checkout)
    response = client.get("/readyz")
    assert killed
    assert response.status_code == 200, response.json
