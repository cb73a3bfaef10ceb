"""Routes for the benchmark only, mounted by ``bench/wsgi.py``; the product never has them.

``GET /bench/sleep`` holds one pooled connection for 50 ms inside PostgreSQL. With one
gevent worker and a pool of 20, the ceiling is 20 / 0.05 s = 400 requests per second,
reachable only if the cooperative wait callback (commng_rotation.bounds) lets the worker
wait on many connections at once.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask

from commng.db import reading, retry_on_disconnect

__all__ = ["SLEEP_S", "bp", "init_app"]

SLEEP_S = 0.05

bp = Blueprint("bench", __name__, url_prefix="/bench")


@bp.get("/sleep")
@retry_on_disconnect  # like every product route that reads or writes
def sleep() -> Any:
    """Run ``SELECT pg_sleep(0.05)`` on a pooled connection and answer (a read, like the product's)."""
    with reading() as session:
        session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLEEP_S})
    return {"slept_ms": int(SLEEP_S * 1000)}


def init_app(app: Flask) -> None:
    """Mount the bench routes on CommNG's app."""
    app.register_blueprint(bp)
