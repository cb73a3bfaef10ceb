"""rotation/example/ end to end, as an adopter runs it: its own venv, its own environment, under rotation.

The venv holds only what the example's requirements.txt names (the layer from a copy of
./rotation, gunicorn[gevent]); the environment is CommNG's variable names with
``POSTGRES_SSL=false`` and ``AWS_REGION`` alone (no ``AWS_DEFAULT_REGION``), on the test
suite's PostgreSQL and a moto server. The roles are made by the SQL block of
rotation/README.md ("Set up the database"), run as written; the tables by ``flask --app
app init-db --owner`` with the DDL login; the service logs in as the app role, which may
only read and write rows.
Under create-and-read load: two alternating-users rotations (the README's ``_clone`` role
logs in) and a single-user one whose window, where AWSCURRENT is already refused, also
kills every idle backend.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from psycopg2 import sql

from devstack import (
    PostgresCluster,
    free_port,
    new_password,
    rotate_alternating,
    rotate_secret,
    secrets_client,
)
from devstack.processes import LoadGenerator, Sample, blocking_reports, monitor_env
from tests.helpers import assert_no_secrets, wait_for
from tests.venvs import REPO, copy_layer, make_venv, run, temporary_dir

pytestmark = pytest.mark.e2e

WORKERS = 2
CLIENTS = 4
# Seconds inside the single-user rotation's window (AWSCURRENT still old, the database already new).
WINDOW_S = 1.0
# Seconds of load at least (0: as long as the rotations take). `make test` keeps it short.
LOAD_S = float(os.environ.get("COMMNG_EXAMPLE_LOAD_S", "0"))


@pytest.fixture(scope="module")
def example() -> Iterator[Path]:
    """A copy of rotation/ beside a venv built from rotation/example/requirements.txt alone."""
    with temporary_dir("commng-example-") as work:
        copy_layer(work / "rotation")
        make_venv(work / "venv", "-r", "rotation/example/requirements.txt", cwd=work)
        yield work


class NotesLoad(LoadGenerator):
    """Each client creates a note, then reads it back and checks its text."""

    def __init__(self, base_url: str, clients: int) -> None:
        super().__init__(base_url, [], clients, max_s=60.0)
        self._last: dict[int, tuple[int, str]] = {}

    def _next_request(self, session: Any, n: int, i: int) -> Sample:
        if i % 2 == 0 or n not in self._last:
            text = f"client {n} note {i} #?%&"
            sample, body = self._call(session.post, "/notes", json={"text": text})
            if sample.status == 201:
                self._last[n] = (int(body["id"]), text)
                with self._lock:
                    self.result.created_ids.append(int(body["id"]))
            return sample
        note_id, text = self._last[n]
        sample, body = self._call(session.get, f"/notes/{note_id}")
        if sample.status == 200 and body != {"id": note_id, "text": text}:
            sample.status, sample.error = 599, f"read back {body!r}"
        return sample


def _adopted(log: Path, version: str) -> set[int]:
    """Workers whose JSON log lines say they refreshed to ``version``."""
    workers = set()
    for line in log.read_text(errors="replace").splitlines():
        if '"refresh_succeeded"' in line and version in line:
            record = json.loads(line)
            if record.get("new_version") == version:
                workers.add(record["worker"])
    return workers


def _all_adopted(log: Path, version: str) -> Callable[[], bool]:
    """A predicate for wait_for: every worker refreshed to ``version``."""
    return lambda: len(_adopted(log, version)) == WORKERS


def _history(pg: PostgresCluster, dbname: str) -> dict[str, list[str]]:
    """The notes service's rotated versions (one per worker and version) and its fleet rows."""
    rotated = pg.execute(
        "SELECT new_version FROM rotation_events WHERE service = 'notes' AND outcome = 'rotated'",
        dbname=dbname,
    )
    workers = pg.execute("SELECT worker FROM rotation_workers WHERE service = 'notes'", dbname=dbname)
    return {"rotated": [r[0] for r in rotated], "workers_left": [w[0] for w in workers]}


def _setup_sql() -> str:
    """The SQL block of rotation/README.md's "Set up the database", as an adopter copies it."""
    readme = (REPO / "rotation" / "README.md").read_text()
    section = readme.split("## Set up the database", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.DOTALL)
    assert block, "rotation/README.md lost its setup SQL"
    return block.group(1)


def _create_logins(pg: PostgresCluster, suffix: str) -> dict[str, str]:
    """A database, then the README's roles in it (with this test's names and passwords)."""
    names = {
        "db": f"notes_{suffix}",
        "owner": f"notes_owner_{suffix}",
        "ddl": f"notes_ddl_{suffix}",
        "app": f"notes_app_{suffix}",
    }
    passwords = {"ddl": new_password(), "app": new_password()}
    pg.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names["db"])))
    text = _setup_sql()
    # Longest names first: notes_app_clone before notes_app; the database (ON DATABASE notes) last.
    for old, new in (
        ("notes_app_clone", f"{names['app']}_clone"),
        ("notes_owner", names["owner"]),
        ("notes_ddl", names["ddl"]),
        ("notes_app", names["app"]),
        ("DATABASE notes", f"DATABASE {names['db']}"),
    ):
        text = re.sub(rf"\b{old}\b", new, text)
    conn = pg.connect(names["db"])
    try:
        with conn.cursor() as cur:
            for who, password in passwords.items():  # psql's :'name' variables, as literals
                text = text.replace(f":'{who}_password'", sql.Literal(password).as_string(cur))
            cur.execute(text)
    finally:
        conn.close()
    return {**names, "ddl_password": passwords["ddl"], "app_password": passwords["app"]}


def _drop_logins(pg: PostgresCluster, logins: dict[str, str]) -> None:
    pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(logins["db"])))
    for role in (f"{logins['app']}_clone", logins["app"], logins["ddl"]):
        pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    # The owner last: its default privileges and grants lived in the database just dropped.
    pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(logins["owner"])))


def _refused_inputs(base_url: str) -> dict[str, int | None]:
    """Statuses of requests the example must turn down with a 4xx, never a 500."""
    cases = {
        "no body": ("post", "/notes", None),
        "empty text": ("post", "/notes", {"text": ""}),
        "not a string": ("post", "/notes", {"text": 7}),
        "nested too deep": ("post", "/notes", None),
        "NUL": ("post", "/notes", {"text": "a\x00b"}),
        "lone surrogate": ("post", "/notes", {"text": "\ud800"}),
        "past bigint": ("get", f"/notes/{2**64}", None),
        "missing": ("get", "/notes/999999999", None),
    }
    statuses: dict[str, int | None] = {}
    headers = {"Connection": "close", "Content-Type": "application/json"}
    for name, (method, path, body) in cases.items():
        # Sent as raw bytes: "nested too deep" is not something json.dumps would write for us.
        data = ("[" * 100_000 + "]" * 100_000) if name == "nested too deep" else json.dumps(body)
        response = requests.request(method, base_url + path, data=data, timeout=10, headers=headers)
        statuses[name] = response.status_code
    return statuses


def test_the_example_serves_through_three_rotations_without_a_failed_request(
    example: Path, pg: PostgresCluster, moto_endpoint: str
) -> None:
    logins = _create_logins(pg, secrets.token_hex(3))
    passwords = [logins["ddl_password"], logins["app_password"]]
    client = secrets_client(moto_endpoint)
    # What RDS manages: {"username", "password"} only; the host, port and database come from POSTGRES_*.
    arns = {
        who: client.create_secret(
            Name=f"example/{logins[who]}",
            SecretString=json.dumps({"username": logins[who], "password": logins[f"{who}_password"]}),
        )["ARN"]
        for who in ("ddl", "app")
    }
    bindir = example / "venv" / "bin"
    appdir = example / "rotation" / "example"
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(example),
        "PYTHONUNBUFFERED": "1",
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(pg.port),
        "POSTGRES_DB": logins["db"],
        "POSTGRES_SSL": "false",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": moto_endpoint,
        "DB_SECRET_REFRESH_INTERVAL_MS": "1000",
        "DB_POOL_GRACE_PERIOD_MS": "2000",
        "WEB_CONCURRENCY": str(WORKERS),
    }
    log = example / f"gunicorn-{logins['db']}.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        created = run(
            [str(bindir / "flask"), "--app", "app", "init-db", "--owner", logins["owner"]],
            env={**env, "DB_SECRET_ID": arns["ddl"], "LOG_LEVEL": "WARNING"},
            cwd=appdir,
            timeout_s=60,
        )
        assert f"tables ready as {logins['owner']}: notes" in created
        port = free_port()
        with log.open("wb") as out:
            server = subprocess.Popen(
                [
                    str(bindir / "gunicorn"),
                    "-c",
                    "gunicorn.conf.py",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "app:app",
                ],
                cwd=appdir,
                # gevent's monitor thread: a greenlet holding the loop (a wait the layer left
                # blocking) is reported.
                env={**env, **monitor_env(), "DB_SECRET_ID": arns["app"]},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: server.poll() is not None or log.read_text().count('"worker_ready"') >= WORKERS, 60)
        assert server.poll() is None, log.read_text()[-3000:]

        load = NotesLoad(f"http://127.0.0.1:{port}", CLIENTS)
        load_started = time.monotonic()
        load.start()
        rotations = []
        # Two rotations as `make rotate` does in the default shape (alternating users: the
        # README's _clone role logs in for the first one), then one single-user rotation
        # whose window also ends every idle backend of the app role, as a failover would.
        for kind in ("alternating", "alternating", "single-user, idle backends killed"):
            password = new_password()
            passwords.append(password)
            if kind == "alternating":
                version, _ = rotate_alternating(client, arns["app"], pg, password)
            else:
                version = rotate_secret(
                    client,
                    arns["app"],
                    pg,
                    logins["app"],
                    password,
                    pause_s=WINDOW_S,
                    before_current=lambda: pg.terminate_backends(logins["app"]),
                )
            rotations.append(version)
            wait_for(_all_adopted(log, version), 30)
        # Some more requests on the last rotation's engines (with the old pools closed), and
        # the load kept up for COMMNG_EXAMPLE_LOAD_S in all when set (the 60 s run).
        served = len(load.result.samples)
        wait_for(lambda: len(load.result.samples) >= served + 100, 20)
        wait_for(lambda: time.monotonic() - load_started >= LOAD_S, LOAD_S + 10)
        result = load.stop()
        load_s = time.monotonic() - load_started
        refused = _refused_inputs(f"http://127.0.0.1:{port}")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        try:
            history = _history(pg, logins["db"])
        finally:
            _drop_logins(pg, logins)

    output = log.read_text(errors="replace")
    # First: the failure message below quotes log lines.
    assert_no_secrets(output, passwords)
    assert_no_secrets(created, passwords)
    failures = result.failures
    errors = [line for line in output.splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert not failures, f"{len(failures)} of {len(result.samples)} failed: {failures[:5]}\n" + "\n".join(
        errors[-5:]
    )
    assert len(result.created_ids) >= 50
    assert len(result.samples) >= 200
    assert server.returncode == 0
    assert refused == {
        "no body": 400,
        "empty text": 400,
        "not a string": 400,
        "nested too deep": 400,
        "NUL": 400,
        "lone surrogate": 400,
        "past bigint": 404,
        "missing": 404,
    }
    assert blocking_reports(output) == []
    # The history, written by the app login through the owner's default privileges: each
    # worker's adoption of each version, and no fleet row left (worker_exit ran).
    for version in rotations:
        assert history["rotated"].count(version) == WORKERS, (version, history)
    assert history["workers_left"] == []
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert records
    assert all("worker" in r for r in records), [r for r in records if "worker" not in r][:3]
    took = sorted(s.duration_ms for s in result.samples)
    print(
        f"\nexample under rotation: {len(result.samples)} requests, {len(failures)} failed, "
        f"{len(rotations)} rotations, {len(result.created_ids)} notes created, "
        f"{load_s:.0f} s of load; "
        f"p50 {took[len(took) // 2]:.0f} ms, p99 {took[len(took) * 99 // 100]:.0f} ms, max {took[-1]:.0f} ms"
    )


def test_the_example_refuses_bad_variables_in_one_line_and_maps_postgres_ssl_true_to_require(
    example: Path, pg: PostgresCluster
) -> None:
    password = new_password()
    base = {
        "PATH": f"{example / 'venv' / 'bin'}:/usr/bin:/bin",
        "HOME": str(example),
        "AWS_REGION": "us-east-1",
        "POSTGRES_USER": "nobody",
        "POSTGRES_PASSWORD": password,
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_PORT": str(pg.port),
    }
    expected = {
        "POSTGRES_SSL=maybe": "configuration error: POSTGRES_SSL must be one of "
        "disable|require|verify-ca|verify-full (or true|false), got 'maybe'",
        "POSTGRES_PORT=99999": "configuration error: POSTGRES_PORT must be an integer from 1 to 65535, "
        "got '99999'",
        "LOG_LEVEL=loud": "configuration error: LOG_LEVEL must be one of DEBUG|INFO|WARNING|ERROR, "
        "got 'loud'",
    }
    outputs = {}
    for assignment in [*expected, "POSTGRES_SSL=true"]:
        name, value = assignment.split("=")
        done = subprocess.run(
            [str(example / "venv" / "bin" / "flask"), "--app", "app", "init-db"],
            cwd=example / "rotation" / "example",
            env={**base, name: value},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0
        outputs[assignment] = done.stdout + done.stderr
    assert_no_secrets("".join(outputs.values()), [password])
    for assignment, line in expected.items():
        assert outputs[assignment].strip().splitlines()[-1] == line
    # true is sslmode require (this server has no TLS), not the libpq value "true".
    assert "server does not support SSL" in outputs["POSTGRES_SSL=true"]
    assert "invalid sslmode" not in outputs["POSTGRES_SSL=true"]
