"""The watcher's loop survives any number of failed checks, and any crash of its own."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask import Flask

from commng_rotation import get_runtime
from commng_rotation.watcher import SecretWatcher
from tests.helpers import wait_for


def _watcher(app: Flask) -> SecretWatcher:
    watcher = get_runtime(app).watcher
    assert watcher is not None
    return watcher


def test_the_backoff_after_thousands_of_failures_is_the_interval(secret_app: Flask) -> None:
    watcher = _watcher(secret_app)
    for failures in (1_024, 1_025, 10_000, 10**9):
        watcher.consecutive_failures = failures
        assert watcher.next_delay_s() == watcher.interval_s


def test_the_loop_keeps_checking_past_1025_failed_checks(
    secret_app: Flask, secretsmanager: Any, secret: str
) -> None:
    """Secrets Manager refuses every check; the loop must go on backing off, not die."""
    watcher = _watcher(secret_app)
    secretsmanager.delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True)
    watcher.interval_s = 0.001  # the backoff is capped by the interval: checks come quickly
    watcher.consecutive_failures = 1_020  # as after about 17 minutes at the 1 s minimum
    watcher.start()
    try:
        wait_for(lambda: watcher.consecutive_failures >= 1_030 or not watcher.running)
        assert watcher.running, "the watcher's loop died"
        assert watcher.consecutive_failures >= 1_030
    finally:
        watcher.stop()


def test_a_loop_that_crashes_is_restarted_and_logged(
    secret_app: Flask, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = _watcher(secret_app)
    watcher.interval_s = 0.001
    calls: list[int] = []
    check_once = watcher.check_once

    def crash_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug outside the per-bind check")
        return check_once(*args, **kwargs)

    monkeypatch.setattr(watcher, "check_once", crash_once)
    caplog.set_level(logging.WARNING)
    watcher.start()
    try:
        wait_for(lambda: len(calls) >= 3 or not watcher.running)
        assert watcher.running, "the watcher's loop died with its first crash"
        assert len(calls) >= 3
    finally:
        watcher.stop()
    assert "secret_watcher_restarted" in caplog.text
    assert not watcher.running
