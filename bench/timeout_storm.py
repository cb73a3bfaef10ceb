"""`python -m bench.timeout_storm`: connects per second in a storm of client-side timeouts.

One gevent process, one engine built by the rotation layer (pool 10, no overflow),
40 greenlets: each query is ``SELECT 1`` (deadline 2 s) or, with probability
``--slow``, ``SELECT pg_sleep(0.15)`` inside a 0.1 s deadline, which the bounded wait
gives up on (psycopg2 then closes that connection). Run twice on a fresh cluster:

- ``pool``: SQLAlchemy's default, every such timeout invalidates the whole pool (the
  layer's ``handle_error`` listener removed: the behaviour before issue 23, defect 9);
- ``connection``: the layer's listener, a timeout invalidates that connection only.

Reports queries, timeouts, new physical connections (per second) and the role's
backends (mean and peak, sampled every 0.25 s by a superuser connection).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from commng_rotation import bounds, engines  # noqa: E402
from commng_rotation.credentials import Credentials  # noqa: E402
from commng_rotation.settings import RotationSettings  # noqa: E402
from devstack import new_password  # noqa: E402
from devstack.postgres import PostgresCluster, running_cluster  # noqa: E402

ROLE = "storm"
GREENLETS = 40
SLOW_SQL = "SELECT pg_sleep(0.15)"
SLOW_DEADLINE_S = 0.1


def _engine(cluster: PostgresCluster, password: str) -> sa.Engine:
    settings = RotationSettings(
        host="127.0.0.1",
        port=cluster.port,
        dbname="postgres",
        sslmode="disable",
        pool_size=10,
        max_overflow=0,
    )
    credentials = Credentials(ROLE, password, "127.0.0.1", cluster.port, "postgres")
    return engines.EngineFactory(settings).build(credentials).engine


def _run(cluster: PostgresCluster, password: str, mode: str, seconds: float, slow: float) -> dict[str, Any]:
    engine = _engine(cluster, password)
    if mode == "pool":
        sa.event.remove(engine, "handle_error", engines._invalidate_by_cause)
    counts = {"queries": 0, "timeouts": 0, "connects": 0}
    sa.event.listen(engine, "connect", lambda *_: counts.__setitem__("connects", counts["connects"] + 1))
    rng = random.Random(23)
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            slow_one = rng.random() < slow
            try:
                with bounds.deadline(SLOW_DEADLINE_S if slow_one else 2.0), engine.connect() as conn:
                    conn.exec_driver_sql(SLOW_SQL if slow_one else "SELECT 1")
                counts["queries"] += 1
            except sa.exc.OperationalError as exc:
                if not bounds.gave_up(exc):
                    raise
                counts["timeouts"] += 1

    samples: list[int] = []
    watcher = cluster.connect()

    def sample() -> None:
        while time.monotonic() < stop:
            with watcher.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (ROLE,))
                samples.append(int(cur.fetchone()[0]))
            gevent.sleep(0.25)

    started = time.monotonic()
    gevent.joinall([gevent.spawn(client) for _ in range(GREENLETS)] + [gevent.spawn(sample)])
    elapsed = time.monotonic() - started
    watcher.close()
    engine.dispose()
    return {
        "invalidates": mode,
        "queries/s": round(counts["queries"] / elapsed),
        "timeouts/s": round(counts["timeouts"] / elapsed),
        "connects/s": round(counts["connects"] / elapsed, 1),
        "connects per timeout": round(counts["connects"] / max(1, counts["timeouts"]), 2),
        "backends mean": round(sum(samples) / max(1, len(samples)), 1),
        "backends peak": max(samples, default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--slow", type=float, default=0.2, help="share of queries that time out")
    args = parser.parse_args()
    bounds.install(default_wait_s=6.0)
    base = Path(tempfile.mkdtemp(prefix="commng-storm-"))
    try:
        with running_cluster(base) as cluster:
            password = new_password()
            cluster.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (password,))
            rows = [_run(cluster, password, mode, args.seconds, args.slow) for mode in ("pool", "connection")]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
