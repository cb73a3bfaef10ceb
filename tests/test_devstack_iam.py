"""`make run AUTH=iam` as a user runs it: tokens instead of a password, and a failover under load.

Its own file (pytest-xdist hands out whole files): it runs beside tests/test_devstack_moves.py,
whose helpers it uses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack import free_port
from tests.localstack import (
    BIN,
    MOVE_ENV,
    ROOT,
    RunningStack,
    assert_every_write_once,
    assert_stopped,
    ctrl_c,
    devstack,
    move_under_load,
    stack_env,
    start_stack,
)

pytestmark = pytest.mark.e2e


def test_auth_iam_serves_with_tokens_shows_its_source_and_rides_a_failover(local_dir: Path) -> None:
    """`make run AUTH=iam`: no secret of the service's, `make status` names the source, a
    failover under load fails nothing, and `make rotate` says there is nothing of the
    service's to rotate."""
    port = free_port()
    log = (local_dir / "run.log").open("ab")
    process = start_stack(local_dir, port, log, "--auth", "iam", env=MOVE_ENV)
    log.close()
    running = RunningStack(process, local_dir, port)
    try:
        assert process.poll() is None, running.log()[-3000:]
        state = running.state()
        assert set(state["secrets"]) == {"master"}  # the master's, for the bootstrap only
        assert f"login    IAM tokens: localhost:{state['iam_port']}" in running.log()
        status = subprocess.run(
            ["make", "-s", "status", f"BIN={BIN}", f"LOCAL_STAMP={sys.executable}"],
            cwd=ROOT,
            env=stack_env(local_dir),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        assert "source      iam: commng_app logs in with an IAM token per new connection" in status.stdout
        assert "iam:20" in status.stdout  # each worker's latest token's issue time
        refused = devstack(local_dir, "rotate")
        assert refused.returncode == 1
        assert "runs AUTH=iam" in refused.stderr

        load, out = move_under_load(running, "failover", "--stale", "2")
        assert "the endpoint points at" in out
        assert_every_write_once(running, load)
        output = running.log()
        assert '"iam_login_refused"' not in output
        assert "X-Amz-Signature" not in output + status.stdout
    finally:
        ctrl_c(running)
    assert_stopped(local_dir, port)
