"""The scenarios: what happens to the stack while the load runs.

Each scenario is a ``Scenario`` (its shape: workers, pool, clients, duration) and an
action that runs during the load. Actions only sleep until fixed offsets from the
start of the load, so every scenario is bounded in time. Offsets scale down in
``--smoke`` mode.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.stack import AppDatabase, BenchStack, ReplicaLogin
from config import Settings
from devstack import moves, new_password, rotate_alternating, rotate_secret

__all__ = ["FAULT_SCENARIOS", "SCENARIOS", "SMOKE", "Context", "Scenario"]


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
    # The replica bind's standby, login and secret (replica scenarios only).
    replica: ReplicaLogin | None = None
    # Every password the app was given: none may appear in its log.
    passwords: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.passwords.append(self.db.password)
        if self.replica is not None:
            self.passwords.append(self.replica.password)

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
        self.passwords.append(new)
        self.rotations.append({"start": steps["pending"], "alter": steps["alter"], "end": steps["current"]})

    def rotate_alternating(self, terminate_idle: bool = False, window_s: float = 1.0) -> None:
        """Secrets Manager's alternating-users rotation (``devstack.rotate_alternating``).

        AWSPENDING names the other user with a new password, ALTER ROLE of that user, then
        ``window_s`` (AWS's testSecret step) before AWSCURRENT moves. ``terminate_idle``:
        right after ALTER ROLE, the idle backends of the user the app logs in as now are
        terminated, so each worker logs in again inside the rotation.
        """
        assert self.secret_arn is not None
        n = len(self.rotations) + 1
        steps: dict[str, float] = {}
        current = json.loads(
            self.stack.client.get_secret_value(SecretId=self.secret_arn, VersionStage="AWSCURRENT")[
                "SecretString"
            ]
        )["username"]
        other = next(role for role in self.db.roles if role != current)

        def log(message: str) -> None:
            if message.startswith("1/3"):
                steps["pending"] = self.mark(f"R{n} pending", "rotation")
            elif message.startswith("2/3"):
                steps["alter"] = self.mark(f"R{n} alter", "rotation")
                # Its pool drained after the previous rotation: what is still open as it?
                self.extra.setdefault("altered_user_backends", []).append(self._backends_of(other))
                if terminate_idle:
                    killed = self.stack.cluster.terminate_backends(current)
                    self.mark(f"R{n} killed {killed} idle", "event")
                time.sleep(window_s)
            elif message.startswith("3/3"):
                steps["current"] = self.mark(f"R{n} current", "rotation")

        new = new_password()
        self.passwords.append(new)
        rotate_alternating(self.stack.client, self.secret_arn, self.stack.cluster, new, log=log)
        self.rotations.append({"start": steps["pending"], "alter": steps["alter"], "end": steps["current"]})

    def _backends_of(self, role: str) -> str:
        """``role``'s backends as "application_name state xN", e.g. "commng-listener idle x2"."""
        rows = self.stack.cluster.execute(
            "SELECT application_name, state, count(*) FROM pg_stat_activity WHERE usename = %s "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            (role,),
        )
        return ", ".join(f"{name} {state} x{n}" for name, state, n in rows) or "none"

    def rotate_replica(self, window_s: float = 1.0) -> None:
        """A single-user rotation of the replica's secret; the primary's is left alone.

        The steps of ``rotate`` (AWSPENDING, ALTER ROLE, ``window_s``, AWSCURRENT moves), but
        AWSPENDING is AWSCURRENT's value with a new password, as AWS's rotation function
        writes it: the secret keeps its host and port. ALTER ROLE runs on the primary; the
        standby replays it.
        """
        assert self.replica is not None
        client, arn, n = self.stack.client, self.replica.arn, len(self.rotations) + 1
        current = client.get_secret_value(SecretId=arn, VersionStage="AWSCURRENT")
        new = new_password()
        self.passwords.append(new)
        token = secrets.token_hex(16)
        value = {**json.loads(current["SecretString"]), "password": new}
        pending = {"ClientRequestToken": token, "SecretString": json.dumps(value)}
        client.put_secret_value(SecretId=arn, VersionStages=["AWSPENDING"], **pending)
        start = self.mark(f"R{n} pending", "rotation")
        self.stack.cluster.set_password(self.replica.role, new)
        alter = self.mark(f"R{n} alter", "rotation")
        time.sleep(window_s)
        old = current["VersionId"]
        client.update_secret_version_stage(
            SecretId=arn, VersionStage="AWSCURRENT", MoveToVersionId=token, RemoveFromVersionId=old
        )
        client.update_secret_version_stage(SecretId=arn, VersionStage="AWSPENDING", RemoveFromVersionId=token)
        end = self.mark(f"R{n} current", "rotation")
        self.replica.password = new
        self.rotations.append({"start": start, "alter": alter, "end": end})

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
    # ``<role>_clone`` exists (alternating-users rotation).
    clone: bool = False
    # A replica bind on the bench's hot standby, with its own SELECT-only login and secret.
    replica: bool = False
    # Reads per message posted (bench/load.py); 1 is devstack's post-then-read load.
    reads_per_write: int = 1
    # Every post carries an Idempotency-Key (the cost table's keyed variant; the fault
    # scenarios' clients send keys anyway, see runs.CLIENT_KEYS).
    keys: bool = False
    # The app connects through the stack's endpoint, with a synchronous standby behind it
    # (BenchStack.movable): the failover and switchover scenarios move it.
    moves: bool = False
    # The app logs in through the IAM-checking endpoint (bench/iam.py): "iam" (DB_AUTH=iam,
    # tokens checked) or "password" (its password twin: the same endpoint relays SCRAM).
    endpoint: str | None = None


def _three_rotations(terminate_idle: bool, alternating: bool = False) -> Callable[[Context], None]:
    """Three rotations of the app secret (single user, or alternating users), 10 s apart."""

    def action(ctx: Context) -> None:
        starts = [2.0] if ctx.smoke else [5.0, 15.0, 25.0]
        for start in starts:
            ctx.sleep_until(start)
            if alternating:
                ctx.rotate_alternating(terminate_idle=terminate_idle)
            else:
                ctx.rotate(terminate_idle=terminate_idle)

    return action


def _rotate_replica_three(ctx: Context) -> None:
    for start in [2.0] if ctx.smoke else [5.0, 15.0, 25.0]:
        ctx.sleep_until(start)
        ctx.rotate_replica()


def _replica_down(ctx: Context) -> None:
    assert ctx.replica is not None
    standby = ctx.replica.standby
    ctx.sleep_until(2.0 if ctx.smoke else 8.0)
    ctx.extra["replica_down_at_s"] = ctx.mark("standby stopping")
    standby.stop("fast")  # pg_ctl stop -m fast -w: returns once it is down
    down = ctx.extra["replica_stopped_at_s"] = ctx.mark("standby down")
    ctx.sleep_until(down + (2.0 if ctx.smoke else 5.0))
    standby.start()  # pg_ctl start -w: returns once it accepts connections
    ctx.extra["replica_up_at_s"] = ctx.mark("standby accepts connections")
    ctx.extra["replica_stopped_s"] = round(ctx.extra["replica_up_at_s"] - down, 2)


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


_MOVE_LABELS = (  # first match wins
    ("green is promoted", "green promoted, endpoint moved"),
    ("crashed", "primary crashed"),
    ("refuses", "endpoint refuses"),
    ("is promoted", "standby promoted"),
    ("points at", "endpoint moved"),
    ("is read-only", "blue read-only"),
    ("replayed", "green caught up"),
    ("terminated", "blue's sessions ended"),
)


def _move(kind: str) -> Callable[[Context], None]:
    """A failover (refused for 3 s, then the promoted standby) or a switchover (1 s read-only)."""

    def action(ctx: Context) -> None:
        stack = ctx.stack
        assert stack.endpoint is not None
        ctx.sleep_until(3.0 if ctx.smoke else 6.0)

        def mark(line: str) -> None:
            # The plot's labels: a few words for each step devstack/moves.py reports.
            step = line.split(": ", 1)[-1]
            short = next((label for words, label in _MOVE_LABELS if words in step), step[:30])
            ctx.mark(short)

        if kind == "failover":
            done = moves.failover(stack.endpoint, stack.cluster, stack.standby(), stale_s=3.0, log=mark)
        else:
            done = moves.switchover(stack.endpoint, stack.cluster, stack.standby(), read_only_s=1.0, log=mark)
        stack.promoted()
        ctx.extra["writes_stopped_at_s"] = round(done.writes_stopped - ctx.t0, 3)
        ctx.extra["moved_at_s"] = round(done.moved - ctx.t0, 3)

    return action


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("steady", "no rotation: the baseline", 20, 4),
        Scenario("static", "DB_SECRET_ID unset: env credentials, no watcher", 20, 4, secrets_manager=False),
        Scenario(
            "rotate", "3 rotations: AWSPENDING, ALTER ROLE, 1 s, AWSCURRENT", 35, 7, _three_rotations(False)
        ),
        Scenario(
            "window-reconnect",
            "like rotate, idle app backends terminated right after ALTER ROLE",
            35,
            7,
            _three_rotations(True),
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
        # Issue 21: the endpoint (RDS's name) moves to the synchronous standby.
        Scenario(
            "failover",
            "primary crashed; the endpoint refuses 3 s, then serves the promoted synchronous standby",
            22,
            12,
            _move("failover"),
            moves=True,
        ),
        Scenario(
            "switchover",
            "Blue/Green: primary read-only 1 s while the standby catches up, promoted, blue's sessions ended",
            22,
            10,
            _move("switchover"),
            moves=True,
        ),
        # Issue 12: several secrets and binds.
        Scenario(
            "alternating",
            "3 alternating-users rotations: AWSPENDING (other user), ALTER ROLE, 1 s, AWSCURRENT",
            35,
            7,
            _three_rotations(False, alternating=True),
            clone=True,
        ),
        Scenario(
            "alternating-kill",
            "like alternating, idle backends of the current user terminated right after ALTER ROLE",
            35,
            7,
            _three_rotations(True, alternating=True),
            clone=True,
        ),
        Scenario(
            "replica-rotate",
            "replica bind on a hot standby, 7 reads per write; 3 single-user rotations of its secret",
            35,
            7,
            _rotate_replica_three,
            replica=True,
            reads_per_write=7,
        ),
        Scenario(
            "replica-down",
            "replica bind on a hot standby, 7 reads per write; standby stopped (fast) for 5 s",
            25,
            7,
            _replica_down,
            replica=True,
            reads_per_write=7,
        ),
        # The yardstick pair (issue 14): interleaved like steady/static, post-then-read load.
        Scenario(
            "service",
            "every feature on (rotation layer, retry, metrics, request ids, JSON access log), pool 5",
            20,
            4,
            pool_size=5,
            max_overflow=0,
            # As deployed: the watcher polls at the product's default interval (5 min),
            # not at the bench's --interval-ms, which rotation scenarios shorten to 2 s.
            env=(("DB_SECRET_REFRESH_INTERVAL_MS", str(Settings().db_secret_refresh_interval_ms)),),
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
        # Issue 25: IAM database authentication, and its password twin through the same
        # local endpoint (bench/iam.py), interleaved. Both at the product's watcher interval.
        Scenario(
            "iam",
            "DB_AUTH=iam via the IAM-checking endpoint (verify-full; token reused 20 s, valid 30 s)",
            60,
            8,
            secrets_manager=False,
            endpoint="iam",
        ),
        Scenario(
            "iam-password",
            "the secret's password (SCRAM) via the same endpoint in password mode (verify-full)",
            60,
            8,
            endpoint="password",
            env=(("DB_SECRET_REFRESH_INTERVAL_MS", str(Settings().db_secret_refresh_interval_ms)),),
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

# The rotation and fault scenarios: each must fail no request, and each runs gevent's
# monitor thread at 100 ms, reporting any greenlet that held a worker's loop. Not the
# throughput comparisons: the monitor's greenlet tracer costs every switch.
FAULT_SCENARIOS = (
    "rotate",
    "window-reconnect",
    "secrets-outage",
    "bad-secret",
    "db-restart",
    "failover",
    "switchover",
    "alternating",
    "alternating-kill",
    "replica-rotate",
    "replica-down",
)

# The smoke mode (`make bench-smoke`, inside `make test`): the claims that matter most, short.
SMOKE = ("steady", "rotate", "bad-secret")
