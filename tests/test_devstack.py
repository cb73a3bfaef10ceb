"""`make run`, `make rotate` and `make status` as a new user runs them (the same code, a private .local).

One stack in the default shape (the app role, alternating users, a hot standby) serves
every test that needs a running one (module-scoped); Ctrl-C stops it at the end and the
teardown checks that nothing is left. One more stack, in the master shape and started on a
.local of the old one-role layout, is stopped by SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack import PostgresCluster, free_port, new_password
from devstack.processes import LoadGenerator, http_status
from tests.helpers import adopted, assert_no_secrets
from tests.localstack import (
    RunningStack,
    assert_stopped,
    current,
    devstack,
    make_status,
    new_local_dir,
    passwords,
    secret_values,
    start_stack,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    """`python -m devstack run` on a free port; Ctrl-C after the module's last test."""
    local_dir = new_local_dir()
    # What a run killed with SIGKILL leaves: its lock file (the lock died with it).
    (local_dir / "run.lock").write_text(json.dumps({"pid": 999999, "port": 1}))
    port = free_port()
    log = (local_dir / "run.log").open("wb")
    # JSON lines for adopted(); a 1 s poll, so that the replica's rotation (no push) is seen soon.
    # The edge as behind the ALB: one trusted proxy, /admin for the loopback only (the tests
    # reach it without X-Forwarded-For, so their own address counts).
    env = {
        "LOG_FORMAT": "json",
        "DB_SECRET_REFRESH_INTERVAL_MS": "1000",
        "ADMIN_ALLOWED_CIDRS": "127.0.0.0/8",
        "TRUSTED_PROXIES": "1",
    }
    process = start_stack(local_dir, port, log, env=env)
    running = RunningStack(process, local_dir, port)
    try:
        assert process.poll() is None, running.log()[-3000:]
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        code = process.wait(90)
        log.close()
        try:
            assert code in (0, -signal.SIGINT, 130), running.log()[-2000:]
            assert_stopped(local_dir, port)
            # Ctrl-C reached devstack alone (gunicorn has a process group of its own), which
            # stopped gunicorn gracefully: no quick quit, no worker quit twice.
            output = running.log()
            assert "Handling signal: term" in output
            assert "Handling signal: int" not in output
            assert "failed with SystemExit" not in output
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)


def _one_role_layout(local_dir: Path) -> None:
    """What `make run` left in .local before the shapes: commng_app owns comm_ng and its tables."""
    superuser = new_password()
    cluster = PostgresCluster(local_dir / "pg" / "data", free_port(), superuser)
    cluster.init()
    cluster.start()
    try:
        cluster.execute("CREATE ROLE commng_app LOGIN")
        cluster.execute("CREATE DATABASE comm_ng OWNER commng_app")
        cluster.execute("CREATE TABLE channels (id int)", dbname="comm_ng")
        cluster.execute("ALTER TABLE channels OWNER TO commng_app", dbname="comm_ng")
    finally:
        cluster.stop("fast")
    state = {"superuser_password": superuser, "app_password": new_password(), "pg_port": cluster.port}
    (local_dir / "stack.json").write_text(
        json.dumps({**state, "admin_token": "old-admin-token-0123456789abcdef"})
    )


def test_the_master_shape_on_an_old_local_dir_rotates_and_stops_on_sigterm(local_dir: Path) -> None:
    """`make run SHAPE=master` on an old .local, `make rotate` RDS-style, then `kill <pid>`."""
    _one_role_layout(local_dir)
    port = free_port()
    with (local_dir / "run.log").open("wb") as log:
        stack = start_stack(local_dir, port, log, "--shape", "master", env={"LOG_FORMAT": "json"})
        running = RunningStack(stack, local_dir, port)
        try:
            assert stack.poll() is None, running.log()[-3000:]
            assert (
                "database comm_ng belongs to commng_app (the one-role layout of an earlier make run): "
                "recreating it empty for SHAPE=master"
            ) in running.log()
            assert "shape    master: the service logs in as commng_master" in running.log()
            assert "replica  none" in running.log()
            # Connection: close, or the kept-alive socket holds its worker's graceful exit for 25 s.
            headers = {"Connection": "close"}
            created = requests.post(
                f"{running.url}/api/channels", json={"name": "m"}, headers=headers, timeout=10
            )
            assert created.status_code == 201

            for secret in ("app", "replica"):  # this shape has neither
                refused = devstack(local_dir, "rotate", "--secret", secret)
                assert refused.returncode == 1
                assert len(refused.stderr.splitlines()) == 1, refused.stderr
                assert f"has no {secret} secret" in refused.stderr
            out = running.rotate("--pause", "0.5")  # the service's: the master secret, single user
            assert "4/4 AWSCURRENT moved" in out
            assert "Secret Label Updated (AWSCURRENT) sent" in out
            version, value = current(running.state(), "master")
            assert value["username"] == "commng_master"
            running.wait_for(lambda: len(adopted(running.log(), version)) == 2, timeout_s=30)
            used = passwords(running.state())
            stack.send_signal(signal.SIGTERM)  # to the Python process only, not its group
            stack.wait(90)
        finally:
            if stack.poll() is None:
                os.killpg(stack.pid, signal.SIGKILL)
                stack.wait(10)
    assert_stopped(local_dir, port)
    assert_no_secrets(running.log() + "".join(running.outputs), used)


def test_without_a_stack_rotate_and_env_say_so_in_one_line(local_dir: Path) -> None:
    for command in ("rotate", "env"):
        result = devstack(local_dir, command)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"no local stack is running (state in {local_dir}): start it with `make run` first"
        ]
        assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--shape", "master", "--replica", "1"],
            "SHAPE=master runs without a replica (the Terraform refuses db_replica_enabled in master "
            "mode too): drop REPLICA=1, or use the app shape",
        ),
        (
            ["--shape", "superuser"],
            "python -m devstack run: argument --shape: invalid choice: 'superuser' "
            "(choose from 'app', 'master')",
        ),
    ],
)
def test_a_shape_that_cannot_run_is_refused_in_one_line(local_dir: Path, args: list[str], line: str) -> None:
    result = devstack(local_dir, "run", *args)
    assert result.returncode in (1, 2)
    assert result.stderr.splitlines() == [line]
    assert not (local_dir / "stack.json").exists()


def test_each_secret_rotates_as_aws_does_and_no_request_fails(stack: RunningStack) -> None:
    output = stack.log()
    assert f"http://127.0.0.1:{stack.port}/readyz" in output
    assert "shape    app: the service logs in as commng_app" in output
    assert "replica  hot standby 127.0.0.1:" in output
    assert "make rotate" in output
    assert "make status" in output
    state = stack.state()
    assert set(state["secrets"]) == {"master", "app", "replica"}
    primary = PostgresCluster(stack.local_dir / "pg" / "data", state["pg_port"], state["superuser_password"])

    channel = requests.post(f"{stack.url}/api/channels", json={"name": "local"}, timeout=10).json()["id"]
    load = LoadGenerator(stack.url, [channel], clients=2, max_s=120)
    load.start()
    try:
        # The app secret: alternating users, the username flips to the clone; both workers adopt it.
        out = stack.rotate()
        assert "3/3 AWSCURRENT moved" in out
        assert "Secret Label Updated (AWSCURRENT) sent" in out
        app_version, app_value = current(state, "app")
        assert app_value["username"] == "commng_app_clone"
        stack.wait_for(lambda: len(adopted(stack.log(), app_version)) == 2, timeout_s=30)
        stack.wait_for(lambda: primary.backend_count("commng_app_clone") > 0, timeout_s=10)
        stack.wait_for(lambda: "rotation_event_received" in stack.log(), timeout_s=10)  # push, then NOTIFY
        app_swaps = _refreshes(stack.log(), bind=None)

        # The master secret, single user: the service does not read it, so hears nothing.
        out = stack.rotate("--secret", "master", "--pause", "0.5")
        assert "4/4 AWSCURRENT moved" in out
        assert "no event: the service does not read the master secret" in out

        # The replica's secret, alternating users: the clone's password is set on the primary
        # and the standby replays it; the secret keeps the standby's host.
        out = stack.rotate("--secret", "replica")
        assert "3/3 AWSCURRENT moved" in out
        assert "Secret Label Updated (AWSCURRENT) sent" in out
        replica_version, replica_value = current(state, "replica")
        assert replica_value["username"] == "commng_ro_clone"
        assert replica_value["port"] == state["standby_port"]  # the rotation kept the standby's host
        stack.wait_for(lambda: len(adopted(stack.log(), replica_version)) == 2, timeout_s=30)
        assert _refreshes(stack.log(), bind=None) == app_swaps  # no swap of the app's engine since
    finally:
        result = load.stop()

    assert len(result.samples) > 20, "the load generator did not run"
    assert result.failures == [], [*map(repr, result.failures[:5])]
    reads = re.search(r'^commng_db_reads_total\{bind="replica"\} (\S+)$', stack.metrics(), re.MULTILINE)
    assert reads is not None
    assert float(reads.group(1)) > 0
    assert_no_secrets(stack.log() + "".join(stack.outputs), passwords(state))


def _refreshes(output: str, bind: str | None) -> int:
    """How many refresh_succeeded lines of ``bind`` the JSON log ``output`` holds."""
    return sum(
        1
        for line in output.splitlines()
        if '"refresh_succeeded"' in line and json.loads(line).get("bind") == bind
    )


def test_a_second_run_is_refused_in_one_line_and_the_first_keeps_serving(stack: RunningStack) -> None:
    second = devstack(stack.local_dir, "run", "--port", str(free_port()), timeout=30)

    assert second.returncode == 1
    assert second.stderr.splitlines() == [
        f"a local stack is already running (pid {stack.process.pid}, {stack.url}, "
        f"state in {stack.local_dir}): stop it with Ctrl-C in its terminal or `kill {stack.process.pid}`"
    ]
    assert second.stdout == ""
    assert http_status(f"{stack.url}/readyz") == 200  # its PostgreSQL was left alone
    assert requests.get(f"{stack.url}/api/channels", timeout=10).status_code == 200


def test_the_state_file_is_private_and_holds_no_login_password(stack: RunningStack) -> None:
    state_file = stack.local_dir / "stack.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = stack.state()
    assert {"superuser_password", "admin_token", "secrets"} <= set(state)
    # The logins' passwords live in the local Secrets Manager only.
    logins = [value["password"] for value in secret_values(state)]
    assert_no_secrets(state_file.read_text(), logins)
    # initdb's password file and the standby's passfile are gone, and no temporary file was left.
    assert not list(stack.local_dir.rglob("*pwfile*"))
    assert not list(stack.local_dir.glob(".*.tmp"))


def test_make_status_and_the_env_command_show_the_running_service(stack: RunningStack) -> None:
    env = devstack(stack.local_dir, "env")
    assert env.returncode == 0, env.stderr
    exports = dict(re.findall(r"^export (\w+)=(.*)$", env.stdout, re.MULTILINE))
    assert exports["PORT"] == str(stack.port)
    state = stack.state()
    assert exports["DB_SECRET_ID"] == state["secrets"]["app"]  # the service's secret, not the master's
    assert {"AWS_ENDPOINT_URL_SECRETS_MANAGER", "ADMIN_TOKEN"} <= set(exports)
    assert "POSTGRES_PASSWORD" not in exports
    assert_no_secrets(env.stdout, passwords(state))

    # The Makefile's recipe with this interpreter's bin/ (and no reinstall of the venv).
    status = make_status(stack.local_dir)
    lines = status.splitlines()
    # Which server the endpoint (the RDS name) serves, and the synchronous standby.
    assert lines[0] == (
        f"endpoint    127.0.0.1:{state['endpoint_port']} serves 127.0.0.1:{state['pg_port']}, the primary"
    )
    assert lines[1] == (
        f"standby     127.0.0.1:{state['standby_port']}, streaming, sync "
        "(every COMMIT waits for it, as in Multi-AZ)"
    )
    assert lines[2] == (
        "# state of the running service, from the rotation history in "
        f"127.0.0.1:{state['endpoint_port']}/comm_ng (not this process)"
    )
    assert lines[3] == f"secret      {state['secrets']['app']}"
    assert lines[4].startswith("AWSCURRENT  ")
    assert_no_secrets(status, [*passwords(state), state["admin_token"]])


def _raw(stack: RunningStack, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of ``method path`` sent as is (no client normalises or re-quotes it)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        connection.request(method, path, headers={**headers, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


# Paths an ALB rule on /admin* or /metrics does not see as such, but Werkzeug routes there.
BYPASSES = [
    ("GET", "//admin/api/status", "admin"),
    ("GET", "/%61dmin/api/status", "admin"),
    ("POST", "//admin/api/rotations/check", "admin"),
    ("GET", "/%6detrics", "metrics"),
]


def test_the_edge_bypass_paths_are_404_on_gunicorn_with_gevent_workers(stack: RunningStack) -> None:
    state = stack.state()
    tokens = {name: {"Authorization": f"Bearer {state[f'{name}_token']}"} for name in ("admin", "metrics")}
    log_before = len(stack.log())
    for method, path, token in BYPASSES:
        # With the right token and without one: a 404 either way, and no failed-login line.
        assert _raw(stack, method, path, tokens[token]) == 404, path
        assert _raw(stack, method, path, {}) == 404, path
    bypass_log = stack.log()[log_before:]
    assert "auth_failed" not in bypass_log
    assert '"admin_action"' not in bypass_log  # the POST ran no check

    # The literal paths still answer, and only the appended X-Forwarded-For entry counts.
    assert _raw(stack, "GET", "/admin/api/status", tokens["admin"]) == 200
    assert _raw(stack, "GET", "/metrics", tokens["metrics"]) == 200
    assert _raw(stack, "GET", "/metrics", tokens["admin"]) == 401  # the admin token is not the scraper's
    spoofed = {**tokens["admin"], "X-Forwarded-For": "127.0.0.1, 203.0.113.9"}
    assert _raw(stack, "GET", "/admin/api/status", spoofed) == 404
    appended = {**tokens["admin"], "X-Forwarded-For": "203.0.113.9, 127.0.0.9"}
    assert _raw(stack, "GET", "/admin/api/status", appended) == 200
    # The banner shows the local admin token on purpose; nothing these requests logged does.
    assert_no_secrets(stack.log()[log_before:], [state["admin_token"], state["metrics_token"]])
    assert_no_secrets(stack.log(), [state["metrics_token"]])


def test_only_gunicorn_workers_write_into_the_metrics_directory(stack: RunningStack) -> None:
    workers = {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", stack.log())}
    assert len(workers) == 2  # gunicorn.conf.py's default; no worker was restarted
    files = list((stack.local_dir / "prometheus").iterdir())
    assert files
    assert {int(f.stem.rsplit("_", 1)[1]) for f in files} == workers  # no bootstrap, no CLI

    metrics = stack.metrics()
    # Each worker's primary and replica engines.
    assert re.search(r'^commng_db_engines\{state="active"\} 4\.0$', metrics, re.MULTILINE), metrics
