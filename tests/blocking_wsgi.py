"""The service's WSGI app plus one route that holds the gevent loop (the monitor's control).

``GET /test/block`` sleeps 0.3 s with the unpatched ``time.sleep``: every greenlet of the
worker waits, which gevent's monitor thread must report. Used by tests/test_e2e_monitor.py.
"""

from gevent import monkey

from wsgi import app  # gevent patches the standard library first

_blocking_sleep = monkey.get_original("time", "sleep")


@app.get("/test/block")
def block() -> str:
    """Hold the loop for longer than GEVENT_MAX_BLOCKING_TIME."""
    _blocking_sleep(0.3)
    return "held the loop"
