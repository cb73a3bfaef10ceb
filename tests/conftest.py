"""Shared fixtures: a real PostgreSQL (scram auth), moto Secrets Manager, app factories.

The cluster is started once per session; every test gets its own login role (with a
password full of URL-breaking characters) and its own database cloned from a migrated
template, so tests are isolated and may rotate passwords freely.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from flask import Flask
from moto import mock_aws
from moto.server import ThreadedMotoServer

from commng.app import create_app
from commng_rotation.runtime import get_runtime
from config import Settings
from devstack import PostgresCluster, free_port
from devstack.postgres import make_standby
from tests.helpers import Database, drop_database, migrated_cluster, new_database, start_image_venv
from tests.localstack import new_local_dir

# Never reach a real AWS account, whatever the environment holds.
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SECRETS_MANAGER"):
    os.environ.pop(_name, None)
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_REGION="us-east-1",
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """When test_image.py will run, start building its venv now: the tests before it run meanwhile."""
    if any(item.path.name == "test_image.py" for item in session.items):
        start_image_venv()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the session, with a migrated template database."""
    with migrated_cluster("commng-pg-") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def standby(pg: PostgresCluster) -> Iterator[PostgresCluster]:
    """A hot standby of ``pg`` (pg_basebackup -R -X stream), shared by the replica tests.

    A test that stops, freezes or detaches it puts it back as it found it.
    """
    base = Path(tempfile.mkdtemp(prefix="commng-standby-"))
    base.chmod(0o755)
    cluster = make_standby(pg, base / "standby")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def database(pg: PostgresCluster) -> Iterator[Database]:
    """A fresh database cloned from the template, and a fresh role that can use it."""
    db = new_database(pg)
    yield db
    drop_database(db)


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """A private .local for a `python -m devstack` of the test's own (tests/localstack.py)."""
    path = new_local_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_app() -> Iterator[Any]:
    """Factory for apps that are stopped (watchers, drains, pools) after the test."""
    apps: list[Flask] = []

    def factory(settings: Settings, **kwargs: Any) -> Flask:
        app = create_app(settings, configure_logging=False, **kwargs)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        get_runtime(app).stop()


@pytest.fixture
def app(database: Database, make_app: Any) -> Flask:
    """An app on env credentials (no Secrets Manager)."""
    flask_app: Flask = make_app(database.settings())
    return flask_app


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


@pytest.fixture
def secretsmanager() -> Iterator[Any]:
    """An in-process moto Secrets Manager client."""
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")


@pytest.fixture
def secret(database: Database, secretsmanager: Any) -> str:
    """The ARN of a secret that holds the test role's credentials."""
    created = secretsmanager.create_secret(Name=f"db/{database.name}", SecretString=database.secret_string())
    arn: str = created["ARN"]
    return arn


@pytest.fixture
def secret_app(database: Database, secretsmanager: Any, secret: str, make_app: Any) -> Flask:
    """An app that reads its credentials from the moto secret (env has none)."""
    settings = database.settings(db_secret_id=secret, postgres_user=None, postgres_password=None)
    flask_app: Flask = make_app(settings, secrets_client=secretsmanager)
    return flask_app


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    """A moto server on a free port, shared by the test and the processes it starts."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory for logs and the like, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="commng-e2e-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
