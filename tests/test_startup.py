"""Start-up paths as an operator meets them: the image's CMD, the CLI, bad configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer
from psycopg2 import sql

from devstack import free_port
from tests.helpers import Database, assert_no_secrets

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(database: Database, login: bool = True, **extra: str) -> dict[str, str]:
    return {**os.environ, **database.env(login, **extra)}


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bad_configuration_stops_gunicorn_with_the_variable_name(database: Database) -> None:
    env = _env(
        database, DB_SECRET_REFRESH_INTERVAL_MS="abc", GUNICORN_CMD_ARGS=f"--bind 127.0.0.1:{free_port()}"
    )
    result = _run([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], env)
    assert result.returncode != 0
    assert (
        "DB_SECRET_REFRESH_INTERVAL_MS must be an integer number of milliseconds >= 1000, got 'abc'"
        in result.stderr
    )
    assert "Booting worker" not in result.stderr + result.stdout
    assert_no_secrets(result.stdout + result.stderr, [database.password])


def test_db_upgrade_creates_the_schema_on_an_empty_database(database: Database) -> None:
    empty = f"{database.name}_empty"
    cluster = database.cluster
    cluster.execute(
        sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(empty), sql.Identifier(database.role))
    )
    try:
        result = _run(
            [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"], _env(database, POSTGRES_DB=empty)
        )
        assert result.returncode == 0, result.stderr[-2000:]
        tables = cluster.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1", dbname=empty
        )
        assert {"alembic_version", "channels", "messages"} <= {t[0] for t in tables}
        assert_no_secrets(result.stdout + result.stderr, [database.password])
    finally:
        cluster.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(empty)))


def test_rotation_cli_reads_and_checks_the_secret(database: Database) -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client: Any = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint)
        arn = client.create_secret(Name="cli", SecretString=database.secret_string())["ARN"]
        env = _env(database, login=False, DB_SECRET_ID=arn, AWS_ENDPOINT_URL_SECRETS_MANAGER=endpoint)
        status = _run([str(BIN / "flask"), "--app", "wsgi", "rotation", "status"], env)
        assert status.returncode == 0, status.stderr[-2000:]
        document = json.loads(status.stdout)  # the logs went to stderr
        assert '"credentials_fetched"' in status.stderr
        versions = client.describe_secret(SecretId=arn)["VersionIdsToStages"].keys()
        assert [b["current_version"] for b in document["binds"]] == list(versions)
        check = _run([str(BIN / "flask"), "--app", "wsgi", "rotation", "check"], env)
        assert check.returncode == 0, check.stderr[-2000:]
        assert json.loads(check.stdout)["result"] == "unchanged"
        assert_no_secrets(status.stdout + status.stderr + check.stdout + check.stderr, [database.password])
    finally:
        server.stop()
