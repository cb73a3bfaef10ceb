"""`make switchover` and `make failover` under load, on the local stack a user runs.

One `python -m devstack run` (a primary, a synchronous hot standby, the endpoint that stands
for RDS's name, moto, gunicorn with two gevent workers): a Blue/Green switchover under load,
then `make rotate` on the new primary; the stack is restarted with `AUTH=iam` (IAM tokens
checked by the stack's own endpoint, no secret of the service's), which makes the promoted
server the primary and a new standby from it; `make status` names the source; then a crash
failover under load, and `make rotate SECRET=master` on the new primary. Clients
retry a 503 once with the same Idempotency-Key, as the README tells them to. For each move:
no request failed, every acknowledged write is on the new primary (none lost), and no
message is there twice (none duplicated).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import free_port
from tests.helpers import adopted, assert_no_secrets
from tests.localstack import (
    assert_every_write_once,
    assert_stopped,
    ctrl_c,
    current,
    devstack,
    make_status,
    move_under_load,
    passwords,
    run_stack,
    where,
)

pytestmark = pytest.mark.e2e


def test_a_switchover_then_a_failover_with_iam_fail_no_request_and_lose_or_repeat_no_write(
    local_dir: Path,
) -> None:
    port = free_port()
    running = run_stack(local_dir, port)
    try:
        state = running.state()
        assert where(running)[0].endswith(f"serves 127.0.0.1:{state['pg_port']}, the primary")

        load, out = move_under_load(running, "switchover", "--read-only", "1")
        assert "green is promoted and the endpoint points at it" in out
        assert_every_write_once(running, load)
        assert where(running)[0].endswith(
            f"serves 127.0.0.1:{state['standby_port']}, the standby promoted by make switchover"
        )
        # Another move needs a standby, which the next make run makes.
        refused = devstack(local_dir, "failover")
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            "the standby was already promoted (make switchover): restart make run to have a new standby"
        ]
        # make rotate works on the new primary, and both workers adopt the new login.
        assert "3/3 AWSCURRENT moved" in running.rotate()
        version, _ = current(running.state(), "app")
        running.wait_for(lambda: len(adopted(running.log(), version)) == 2, timeout_s=30)
        used = passwords(running.state())
        ctrl_c(running)

        # The next run, with IAM tokens instead of the rotated password (make run AUTH=iam):
        # the promoted server is the primary, with a new synchronous standby.
        running = run_stack(local_dir, port, "--auth", "iam")
        assert "is the primary now" in running.log()
        state = running.state()
        shown = where(running)
        assert shown[0].endswith(f"serves 127.0.0.1:{state['pg_port']}, the primary")
        assert shown[1].startswith(f"standby     127.0.0.1:{state['standby_port']}, streaming, sync")
        assert set(state["secrets"]) == {"master"}  # the master's, for the bootstrap only
        assert f"login    IAM tokens: localhost:{state['iam_port']}" in running.log()
        status = make_status(local_dir)
        assert "source      iam: commng_app logs in with an IAM token per new connection" in status
        assert "iam:20" in status  # each worker's latest token's issue time
        refused = devstack(local_dir, "rotate")
        assert refused.returncode == 1
        assert "runs AUTH=iam" in refused.stderr

        load, out = move_under_load(running, "failover", "--stale", "2")
        assert "the endpoint refuses connections for 2 s" in out
        assert_every_write_once(running, load)
        assert "4/4 AWSCURRENT moved" in running.rotate("--secret", "master", "--pause", "0.5")
        used += passwords(running.state())
        output = running.log()
        assert '"iam_login_refused"' not in output
        assert "X-Amz-Signature" not in output + status
    finally:
        ctrl_c(running)
    assert_stopped(local_dir, port)
    assert_no_secrets(running.log() + "".join(running.outputs), used)
