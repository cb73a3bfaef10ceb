"""`python -m bench.waits`: CPU per database-socket wait under gevent, bounded and not.

The wait callback runs several times per request (each statement waits to send and to
receive). On a socket that is already readable, 50,000 waits each, interleaved twice:

- ``gevent.wait_read(timeout=...)``: gevent's bounded wait (a ``gevent.Timeout`` around it);
- ``gevent.wait_read``: psycogreen's unbounded wait (the yardstick's);
- ``commng_rotation.bounds``: the rotation layer's bounded wait (an io and a timer watcher).
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import psycopg2  # noqa: E402
from gevent.socket import wait_read  # noqa: E402

from commng_rotation import bounds  # noqa: E402

WAITS = 50_000


def _gevent_bounded(fd: int) -> None:
    wait_read(fd, timeout=30.0, timeout_exc=psycopg2.OperationalError("timeout expired"))


def _gevent_unbounded(fd: int) -> None:
    wait_read(fd)


def main() -> None:
    ours = bounds._gevent_waiter()
    variants: dict[str, Callable[[int], None]] = {
        "gevent.wait_read(timeout=...)": _gevent_bounded,
        "gevent.wait_read": _gevent_unbounded,
        "commng_rotation.bounds": lambda fd: ours(fd, False, 30.0),
    }
    a, b = socket.socketpair()
    try:
        b.send(b"ready")
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):
            for name, wait in variants.items():
                started = time.process_time()
                for _ in range(WAITS):
                    wait(a.fileno())
                results[name].append((time.process_time() - started) / WAITS * 1e6)
        for name, runs in results.items():
            print(f"{name:32s} {min(runs):5.2f} us/wait (best of {len(runs)})")
    finally:
        a.close()
        b.close()


if __name__ == "__main__":
    main()
