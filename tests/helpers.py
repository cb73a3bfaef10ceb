"""Small helpers shared by tests: bounded polling and secret-leak checks."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterable


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


def assert_no_secrets(text: str, secrets: Iterable[str]) -> None:
    """No password (raw or URL-encoded) appears in ``text``."""
    for secret in secrets:
        for form in {secret, urllib.parse.quote(secret), urllib.parse.quote_plus(secret)}:
            assert form not in text, "a password appears in the captured output"
