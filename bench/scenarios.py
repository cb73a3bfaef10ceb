"""The scenarios: what happens to the stack while the load runs.

Each scenario is a ``Scenario`` (its shape: workers, pool, clients, duration) and an
action that runs during the load. Actions only sleep until fixed offsets from the
start of the load, so every scenario is bounded in time. Offsets scale down in
``--smoke`` mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.stack import AppDatabase, BenchStack
from devstack import new_password, rotate_secret

__all__ = ["SCENARIOS", "SMOKE", "Context", "Scenario"]


@dataclass
class Context:
    """What an action may touch, and where it records what it did (seconds from t0)."""

    stack: BenchStack
    db: AppDatabase
    secret_arn: str | None
    t0: float
    smoke: bool
    marks: list[dict[str, Any]] = field(default_factory=list)
    rotations: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, label: str, kind: str = "event") -> float:
        """Record that ``label`` happened now; ``kind`` is rotation (a step) or event."""
        t = round(self.now(), 3)
        self.marks.append({"t": t, "label": label, "kind": kind})
        return t

    def sleep_until(self, t: float) -> None:
        """Sleep until ``t`` seconds after the load started (no-op when already past)."""
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    def rotate(self, terminate_idle: bool = False, window_s: float = 1.0) -> None:
        """A realistic rotation: AWSPENDING, ALTER ROLE, ``window_s``, AWSCURRENT moves."""
        assert self.secret_arn is not None
        n = len(self.rotations) + 1
        steps: dict[str, float] = {}
        names = {"1/4": "pending", "2/4": "alter", "3/4": "window", "4/4": "current"}

        def log(message: str) -> None:
            step = names.get(message[:3])
            if step:
                steps[step] = self.mark(f"R{n} {step}", "rotation")

        def terminate() -> None:
            killed = self.stack.cluster.terminate_backends(self.db.role)
            self.mark(f"R{n} killed {killed} idle", "event")

        new = new_password()
        rotate_secret(
            self.stack.client,
            self.secret_arn,
            self.stack.cluster,
            self.db.role,
            new,
            window_s,
            log=log,
            before_current=terminate if terminate_idle else None,
        )
        self.db.password = new
        self.rotations.append({"start": steps["pending"], "alter": steps["alter"], "end": steps["current"]})

    def put_current(self, value: str) -> None:
        """Write a new secret version straight to AWSCURRENT (a manual edit of the secret)."""
        self.stack.client.put_secret_value(SecretId=self.secret_arn, SecretString=value)


@dataclass(frozen=True)
class Scenario:
    """One scenario's shape; ``action`` runs while the load does."""

    name: str
    description: str
    duration_s: float
    smoke_duration_s: float
    action: Callable[[Context], None] | None = None
    secrets_manager: bool = True
    workers: int | None = None
    pool_size: int = 8
    max_overflow: int = 4
    clients: int = 16
    path: str | None = None
    # The gunicorn entry point (default: the product's, or bench.wsgi:app with ``path``).
    entry: str | None = None
    # Extra environment of the app (e.g. BENCH_WITHOUT for bench/feature_wsgi.py).
    env: tuple[tuple[str, str], ...] = ()


def _rotate_three(terminate_idle: bool) -> Callable[[Context], None]:
    def action(ctx: Context) -> None:
        starts = [2.0] if ctx.smoke else [5.0, 15.0, 25.0]
        for start in starts:
            ctx.sleep_until(start)
            ctx.rotate(terminate_idle=terminate_idle)

    return action


def _secrets_outage(ctx: Context) -> None:
    down_s = 2.0 if ctx.smoke else 15.0
    ctx.sleep_until(2.0 if ctx.smoke else 5.0)
    ctx.stack.moto.stop()
    ctx.mark("moto stopped")
    time.sleep(down_s)
    ctx.stack.moto.start()
    ctx.mark("moto back (same state)")
    # A rotation after the outage shows that the watcher came back from its backoff.
    ctx.sleep_until(ctx.now() + (1.0 if ctx.smoke else 4.0))
    ctx.rotate()


def _bad_secret(ctx: Context) -> None:
    step_s = 1.0 if ctx.smoke else 3.0
    ctx.sleep_until(2.0 if ctx.smoke else 5.0)
    ctx.put_current(json.dumps({"username": ctx.db.role}))
    ctx.mark("AWSCURRENT: no password")
    time.sleep(step_s)
    ctx.put_current("{not json")
    ctx.mark("AWSCURRENT: not JSON")
    time.sleep(step_s)
    ctx.put_current(json.dumps({"username": ctx.db.role, "password": ctx.db.password}))
    ctx.mark("AWSCURRENT: fixed")


def _db_restart(ctx: Context) -> None:
    ctx.sleep_until(3.0 if ctx.smoke else 6.0)
    ctx.mark("PostgreSQL stopping")
    ctx.stack.cluster.stop("fast")
    ctx.extra["down_at_s"] = ctx.mark("PostgreSQL down")
    time.sleep(1.0 if ctx.smoke else 3.0)
    ctx.stack.cluster.start()  # pg_ctl -w: returns once it accepts connections
    ctx.extra["up_at_s"] = ctx.mark("PostgreSQL accepts connections")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "no rotation: the baseline", 20, 4),
        Scenario("static", "DB_SECRET_ID unset: env credentials, no watcher", 20, 4, secrets_manager=False),
        Scenario(
            "rotate", "3 rotations: AWSPENDING, ALTER ROLE, 1 s, AWSCURRENT", 35, 7, _rotate_three(False)
        ),
        Scenario(
            "window-reconnect",
            "like rotate, idle app backends terminated right after ALTER ROLE",
            35,
            7,
            _rotate_three(True),
        ),
        Scenario(
            "secrets-outage",
            "moto down 15 s, back with the same state, then a rotation",
            34,
            9,
            _secrets_outage,
        ),
        Scenario(
            "bad-secret", "AWSCURRENT without password 3 s, not JSON 3 s, then fixed", 20, 6, _bad_secret
        ),
        Scenario("db-restart", "PostgreSQL stopped (fast) for 3 s, then started", 22, 7, _db_restart),
        # The yardstick pair (issue 14): interleaved like steady/static, post-then-read load.
        Scenario(
            "service",
            "every feature on (rotation layer, retry, metrics, request ids, JSON access log), pool 5",
            20,
            4,
            pool_size=5,
            max_overflow=0,
        ),
        Scenario(
            "baseline",
            "bare Flask-SQLAlchemy port (bench/baseline.py): static engine, pool 5, pre-ping, no access log",
            20,
            4,
            secrets_manager=False,
            pool_size=5,
            max_overflow=0,
            entry="bench.baseline_wsgi:app",
        ),
        Scenario(
            "concurrency",
            "1 worker, pool 20, GET /bench/sleep (SELECT pg_sleep(0.05))",
            15,
            3,
            workers=1,
            pool_size=20,
            max_overflow=0,
            clients=40,
            path="/bench/sleep",
        ),
    )
}

# The smoke mode (`make bench-smoke`, inside `make test`): the claims that matter most, short.
SMOKE = ("steady", "rotate", "bad-secret")
