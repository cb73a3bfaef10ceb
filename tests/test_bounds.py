"""The bounded wait and the deadlines, on their own (gunicorn-level faults: test_faults.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg2
import pytest
from gevent import get_hub

from commng_rotation import bounds
from commng_rotation.engines import _caller_retries, caller_retries


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_the_gevent_wait_returns_once_the_socket_is_ready(pair: tuple[socket.socket, socket.socket]) -> None:
    wait = bounds._gevent_waiter()
    a, b = pair
    active = get_hub().loop.activecnt
    wait(a.fileno(), True, 5.0)  # writable at once
    b.send(b"x")
    wait(a.fileno(), False, 5.0)  # readable now
    assert get_hub().loop.activecnt == active  # both watchers of each wait are gone


def test_the_gevent_wait_raises_libpqs_timeout_when_nothing_comes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    wait = bounds._gevent_waiter()
    a, _ = pair
    active = get_hub().loop.activecnt
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match=r"^timeout expired$"):
        wait(a.fileno(), False, 0.05)
    assert 0.04 <= time.monotonic() - started < 5.0
    assert get_hub().loop.activecnt == active


def test_the_gevent_wait_lasts_its_bound_even_after_cpu_work_that_left_the_loop_time_stale(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """libev keeps a cached "now", updated when the loop runs: after CPU work that did not let
    it run, a timer started from that cached time ends early (seen: 34 ms for a 50 ms bound
    on a loaded machine). The wait's timer starts from the time now."""
    wait = bounds._gevent_waiter()
    a, _ = pair
    get_hub().loop.update_now()
    busy_until = time.monotonic() + 0.08
    while time.monotonic() < busy_until:  # the loop does not run: its cached time goes stale
        pass
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match=r"^timeout expired$"):
        wait(a.fileno(), False, 0.05)
    assert time.monotonic() - started >= 0.045


def test_deadlines_nest_and_only_ever_shorten() -> None:
    assert bounds.remaining() is None
    with bounds.deadline(10):
        outer = bounds.remaining()
        assert outer is not None
        assert 9 < outer <= 10
        with bounds.deadline(100):
            inner = bounds.remaining()
            assert inner is not None
            assert inner <= 10
        with bounds.deadline(1):
            inner = bounds.remaining()
            assert inner is not None
            assert inner <= 1
        after = bounds.remaining()
        assert after is not None
        assert 9 < after <= 10
    assert bounds.remaining() is None


def test_outage_wait_and_caller_retries_are_undone_on_the_way_out() -> None:
    assert bounds.outage_deadline() is None
    with bounds.outage_wait(5):
        until = bounds.outage_deadline()
        assert until is not None
        assert until > time.monotonic()
        with bounds.outage_wait(0):  # a replica connect: no outage wait inside
            assert bounds.outage_deadline() is None
        assert bounds.outage_deadline() == until
    assert bounds.outage_deadline() is None
    with caller_retries():
        assert _caller_retries.get() is True
        with caller_retries(False):
            assert _caller_retries.get() is False
        assert _caller_retries.get() is True
    assert _caller_retries.get() is False
    with pytest.raises(RuntimeError), bounds.deadline(1):
        raise RuntimeError("the block fails")
    assert bounds.remaining() is None
