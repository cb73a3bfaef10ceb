"""DB_AUTH=iam against a real PostgreSQL over TLS (verify-full) that asks for a cleartext password.

What cannot run here is RDS checking the token, so the signer is the one stand-in: a
client whose ``generate_db_auth_token`` answers a real botocore token (which PostgreSQL
refuses: it is not the role's password) or the role's password (which it accepts). All
else is the real path: the app, the engine's connect hook, libpq over TLS sending the
"token" in cleartext, PostgreSQL refusing or accepting it, /readyz, metrics, history and
fleet rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from flask import Flask
from prometheus_client import REGISTRY

from commng_rotation import RotationSettings, get_runtime
from commng_rotation.credentials import Credentials
from commng_rotation.engines import EngineFactory
from commng_rotation.iam import REFUSED_REASON, IamTokenSource, rds_signer
from config import Settings
from devstack import PostgresCluster
from tests.helpers import Database, assert_no_secrets, drop_database, make_template, new_database
from tests.tls import tls_cluster


class Signer:
    """An RDS client's ``generate_db_auth_token``: a real token ``refuse`` times, then ``password``."""

    def __init__(self, password: str, refuse: int) -> None:
        self.password = password
        self.refuse = refuse
        self.calls: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self._real = boto3.client("rds", region_name="us-east-1")

    def generate_db_auth_token(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        if len(self.calls) <= self.refuse:
            token: str = self._real.generate_db_auth_token(**kwargs)
            self.tokens.append(token)
            return token
        return self.password


class NoSecretsManager:
    """Fails the test on any use: in iam mode nothing may call Secrets Manager."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Secrets Manager was called ({name}) in iam mode")


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[PostgresCluster, Path]]:
    """A migrated cluster whose TLS logins are asked for a cleartext password, as RDS asks for a token."""
    with tls_cluster(("hostssl all all 127.0.0.1/32 password",)) as (cluster, right, _):
        make_template(cluster)  # over plain TCP: scram, as every test cluster
        yield cluster, right


@pytest.fixture
def iam_db(tls_pg: tuple[PostgresCluster, Path]) -> Iterator[Database]:
    db = new_database(tls_pg[0])
    yield db
    drop_database(db)


def _settings(db: Database, right_ca: Path) -> Settings:
    return db.settings(
        db_auth="iam",
        postgres_password=None,
        postgres_host="localhost",  # a name: the token is signed for it, verify-full checks it
        postgres_ssl="verify-full",
        postgres_ssl_root_cert=str(right_ca),
        aws_region="us-east-1",
    )


def _app(make_app: Any, db: Database, right_ca: Path, signer: Signer) -> Flask:
    app: Flask = make_app(_settings(db, right_ca), rds_client=signer, secrets_client=NoSecretsManager())
    return app


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_refused_token_gets_a_fresh_one_and_the_service_serves_with_no_secret(
    tls_pg: tuple[PostgresCluster, Path], iam_db: Database, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    refused = _value("commng_db_logins_refused_total", source="iam", cause="invalid_password")
    signed = _value("commng_db_iam_tokens_signed_total")
    signer = Signer(iam_db.password, refuse=1)
    app = _app(make_app, iam_db, tls_pg[1], signer)
    client = app.test_client()

    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    created = client.post("/api/channels", json={"name": "iam"})
    assert created.status_code == 201

    wanted = {"DBHostname": "localhost", "Port": iam_db.cluster.port, "DBUsername": iam_db.role}
    assert signer.calls == [{**wanted, "Region": "us-east-1"}] * 2
    assert _value("commng_db_logins_refused_total", source="iam", cause="invalid_password") == refused + 1
    assert _value("commng_db_iam_tokens_signed_total") == signed + 2
    runtime = get_runtime(app)
    assert runtime.watcher is None
    assert runtime.push is None
    assert runtime.fanout is None
    status = runtime.status()
    assert status["binds"][0]["source"] == "iam"
    version = status["binds"][0]["current_version"]
    assert version is not None
    assert version.startswith("iam:")
    with app.app_context():
        engine = runtime.rotator().active.engine  # type: ignore[union-attr]
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").scalar()

    # History and fleet show the source and each token's issue time, never the token.
    assert runtime.history.flush()
    assert runtime.fleet is not None
    assert runtime.fleet.report_once()
    with engine.connect() as conn:
        events = conn.exec_driver_sql(
            "SELECT trigger, outcome, new_version FROM rotation_events WHERE trigger = 'token'"
        ).all()
        fleet = conn.exec_driver_sql("SELECT current_version FROM rotation_workers").scalars().all()
    assert [(t, o) for t, o, _ in events] == [("token", "rotated")] * 2
    assert all(v.startswith("iam:") for _, _, v in events)
    assert fleet == [version]
    assert "iam_token_refused" in caplog.text
    assert_no_secrets(caplog.text, [iam_db.password, *signer.tokens])


def test_readyz_says_why_when_a_fresh_token_is_refused_too(
    tls_pg: tuple[PostgresCluster, Path], iam_db: Database, make_app: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    signer = Signer(iam_db.password, refuse=1000)  # e.g. the login was never granted rds_iam
    app = _app(make_app, iam_db, tls_pg[1], signer)
    client = app.test_client()

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json() == {"status": "unavailable", "reason": REFUSED_REASON}
    assert "iam_login_refused" in caplog.text
    assert_no_secrets(caplog.text + ready.get_data(as_text=True), [iam_db.password, *signer.tokens])

    signer.refuse = 0  # rds_iam granted: the next login signs anew and works
    assert client.get("/readyz").status_code == 200


def test_an_open_connection_outlives_its_token_and_only_new_ones_sign_again(
    tls_pg: tuple[PostgresCluster, Path], iam_db: Database
) -> None:
    now = [0.0]
    settings = RotationSettings(
        auth="iam",
        username=iam_db.role,
        host="localhost",
        port=iam_db.cluster.port,
        dbname=iam_db.name,
        sslmode="verify-full",
        ssl_root_cert=str(tls_pg[1]),
        aws_region="us-east-1",
    )
    signer = Signer(iam_db.password, refuse=0)
    source = IamTokenSource(rds_signer(signer), settings, clock=lambda: now[0])
    factory = EngineFactory(settings)
    factory.login = source
    engine = factory.build(source.fetch().credentials).engine
    try:
        with engine.connect() as conn:
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        now[0] += 3600  # four token lifetimes later
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == first
            assert source.signed == 1  # the pooled connection needed no token
            with engine.connect() as other:
                other.exec_driver_sql("SELECT 1")
        assert source.signed == 2  # a new one did
        assert isinstance(source.fetch().credentials, Credentials)
        assert engine.pool._recycle == settings.rotation_period_s  # type: ignore[attr-defined]
    finally:
        engine.dispose()
