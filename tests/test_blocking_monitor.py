"""The check behind "no greenlet blocks a worker's loop" can fail: gevent's monitor thread,
turned on as the end-to-end tests turn it on, reports a greenlet that holds the loop, and
``blocking_reports`` finds the report in the output."""

from __future__ import annotations

import os
import subprocess
import sys

from devstack.processes import blocking_reports, monitor_env

BLOCKER = """
from gevent import monkey
monkey.patch_all()
import time
import gevent

def busy():
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # CPU work that never yields to the loop
        pass

def cooperative():
    gevent.sleep(0.3)  # a wait: the loop runs on

gevent.joinall([gevent.spawn(cooperative), gevent.spawn(busy)])
gevent.sleep(0.3)  # the monitor looks every max_blocking_time
"""


def _run(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **monitor_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return run.stdout + run.stderr


def test_a_greenlet_that_holds_the_loop_is_reported() -> None:
    reports = blocking_reports(_run(BLOCKER))
    assert reports
    assert "in busy" in reports[0]


def test_cooperative_waits_are_not_reported() -> None:
    assert blocking_reports(_run(BLOCKER.replace("gevent.spawn(busy)", "gevent.spawn(cooperative)"))) == []
