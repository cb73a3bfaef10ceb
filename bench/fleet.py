"""Scenario ``fleet``: 4 gunicorns x 2 workers, one PostgreSQL, one secret, a rotation under load.

Run three times, once per way a worker can learn of the rotation, each with a fresh
database, role, secret and four gunicorns (this repository's gunicorn.conf.py and wsgi.py):

- ``poll``: only the watcher, every ``POLL_INTERVAL_MS`` (±10 %); no queue, no fan-out.
- ``reactive``: no poll within the run (10 min interval), no queue, no fan-out; right after
  ``ALTER ROLE`` every idle backend of the role is terminated, so workers must log in
  inside the window and learn from the refused login (28P01). A worker that needs no new
  connection learns nothing: it shows as not adopted.
- ``push``: no poll within the run; the queue and LISTEN/NOTIFY fan-out. The bench sends
  the "Secret Label Updated" event once AWSCURRENT moved, as EventBridge would.

Reported per mode: detection spread (first to last worker on the new version, from the
workers' own ``refresh_succeeded`` log lines), first and last adoption after AWSCURRENT
moved, adoptions by trigger, backends of the role (sampled every 0.25 s; listener
connections included): the median before the rotation, the peak after it, and the
median of the last ``SETTLED_S`` once the old pools closed. Pools grow up to their size
as concurrency requires and a new pool starts where the old one stopped, so the target
ratio is peak / settled: what the rotation adds on top of where the fleet settles. Failed
requests, and the calls the moto server received by API (Secrets Manager and SQS).
Only ``make bench`` runs it (``--scenario fleet`` alone is about 3 minutes), never the smoke.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from botocore.config import Config

from bench.moto import BENCH_AGENT
from bench.stack import BackendSampler, BenchStack
from devstack import free_port, new_password, rotate_secret
from devstack.events import create_rotation_queue, send_rotation_event
from devstack.processes import GunicornServer, LoadGenerator

__all__ = ["NAME", "run"]

NAME = "fleet"
INSTANCES = 4
WORKERS = 2
CLIENTS_PER_INSTANCE = 4
POOL_SIZE = 4
MAX_OVERFLOW = 2
POLL_INTERVAL_MS = 5000
QUIET_INTERVAL_MS = 600_000
GRACE_MS = 3000
WARMUP_S = 5.0
STEADY_S = 5.0
WINDOW_S = 1.0
ADOPT_TIMEOUT_S = 20.0
AFTER_S = GRACE_MS / 1000 + 2.0
# The samples of the last seconds, old pools closed: the fleet's steady state after the rotation.
SETTLED_S = 2.0
TARGET_PEAK_RATIO = 1.2
SM_APIS = {"DescribeSecret", "GetSecretValue", "ListSecretVersionIds", "PutSecretValue"}


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    interval_ms: int
    push: bool
    fanout: bool
    terminate_idle: bool


MODES = (
    Mode("poll", f"poll every {POLL_INTERVAL_MS} ms only", POLL_INTERVAL_MS, False, False, False),
    Mode(
        "reactive",
        "refused logins only (idle backends killed in the window)",
        QUIET_INTERVAL_MS,
        False,
        False,
        True,
    ),
    Mode("push", "SQS push + LISTEN/NOTIFY fan-out", QUIET_INTERVAL_MS, True, True, False),
)


def _sqs(stack: BenchStack) -> Any:
    import boto3

    return boto3.client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=stack.moto.endpoint,
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=Config(user_agent_extra=BENCH_AGENT),  # the bench's own calls are not counted
    )


def _env(
    stack: BenchStack, mode: Mode, dbname: str, arn: str, queue_url: str | None, prometheus: Path
) -> dict[str, str]:
    env = {
        **stack.app_env(dbname, prometheus, (POOL_SIZE, MAX_OVERFLOW), mode.interval_ms, GRACE_MS),
        "DB_SECRET_ID": arn,
        "DB_ROTATION_FANOUT": "true" if mode.fanout else "false",
        "AWS_ENDPOINT_URL_SQS": stack.moto.endpoint,
    }
    if queue_url:
        env["DB_ROTATION_QUEUE_URL"] = queue_url
    return env


def _adoptions(servers: list[GunicornServer], version: str) -> dict[str, tuple[float, str]]:
    """'instance:pid' -> (unix time, trigger) of each worker's refresh_succeeded for ``version``."""
    found: dict[str, tuple[float, str]] = {}
    for i, server in enumerate(servers):
        for line in server.output().splitlines():
            if '"refresh_succeeded"' not in line or not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("new_version") == version:
                at = datetime.fromisoformat(record["timestamp"]).timestamp()
                found.setdefault(f"{i}:{record['pid']}", (at, str(record.get("trigger"))))
    return found


def _start_all(servers: list[GunicornServer]) -> None:
    errors: list[BaseException] = []

    def start(server: GunicornServer) -> None:
        try:
            server.start(timeout_s=120)
        except BaseException as exc:  # reported after every start returned
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    if errors:
        raise RuntimeError(f"a gunicorn did not start: {errors[0]}")


def _wait(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def run_mode(stack: BenchStack, mode: Mode) -> dict[str, Any]:
    """One mode: fresh database, secret (and queue), 4 gunicorns, load, one rotation."""
    db = stack.new_database(f"fleet_{mode.name}")
    arn = stack.create_secret(f"fleet_{mode.name}", db)
    sqs = _sqs(stack) if mode.push else None
    queue_url = create_rotation_queue(sqs, f"fleet-{mode.name}-{db.name}"[:80]) if sqs else None
    workdir = stack.workdir_for(f"fleet-{mode.name}")
    servers = []
    for i in range(INSTANCES):
        prometheus = workdir / f"prometheus-{i}"
        prometheus.mkdir(exist_ok=True)
        env = _env(stack, mode, db.name, arn, queue_url, prometheus)
        servers.append(GunicornServer(env, free_port(), WORKERS, workdir / f"gunicorn-{i}.log"))
    print(f"[fleet/{mode.name}] {mode.description}: {INSTANCES} gunicorns x {WORKERS} workers", flush=True)
    try:
        _start_all(servers)
        if mode.fanout:
            _wait(
                lambda: all(s.output().count('"rotation_listener_connected"') >= WORKERS for s in servers), 30
            )
        with requests.Session() as session:
            channels = [
                int(
                    session.post(
                        f"{servers[0].url}/api/channels", json={"name": f"f-{i}"}, timeout=10
                    ).json()["id"]
                )
                for i in range(3)
            ]
        loads = [LoadGenerator(s.url, channels, CLIENTS_PER_INSTANCE, max_s=120) for s in servers]
        for load in loads:
            load.start()
        time.sleep(WARMUP_S)  # first connections of every pool: not the steady state
        stack.moto.take_calls()
        t0 = time.monotonic()
        sampler = BackendSampler(stack.cluster, (db.role,), t0, period_s=0.25)
        sampler.start()
        time.sleep(STEADY_S)
        kill = (lambda: stack.cluster.terminate_backends(db.role)) if mode.terminate_idle else None
        rotated_at = time.monotonic() - t0
        version = rotate_secret(
            stack.client, arn, stack.cluster, db.role, new_password(), WINDOW_S, before_current=kill
        )
        moved = time.time()
        if sqs is not None and queue_url is not None:
            send_rotation_event(sqs, queue_url, arn, version)
        total = INSTANCES * WORKERS
        _wait(lambda: len(_adoptions(servers, version)) >= total, ADOPT_TIMEOUT_S, 0.1)
        time.sleep(AFTER_S)  # old pools drain within the grace period
        results = [load.stop() for load in loads]
        sampler.stop()
        calls = stack.moto.take_calls()
        adoptions = _adoptions(servers, version)
    finally:
        for server in servers:
            server.stop()
    before = [n for t, n in sampler.series if t < rotated_at]
    after = [n for t, n in sampler.series if t >= rotated_at]
    end = sampler.series[-1][0] if sampler.series else 0.0
    settled_samples = [n for t, n in sampler.series if t >= max(rotated_at, end - SETTLED_S)]
    steady = statistics.median(before) if before else None
    settled = statistics.median(settled_samples) if settled_samples else None
    peak = max(after, default=None)
    times = sorted(at for at, _ in adoptions.values())
    triggers: dict[str, int] = {}
    for _, trigger in adoptions.values():
        triggers[trigger] = triggers.get(trigger, 0) + 1
    samples = [s for r in results for s in r.samples]
    return {
        "mode": mode.name,
        "description": mode.description,
        "interval_ms": mode.interval_ms,
        "workers": total,
        "adopted": len(adoptions),
        "adopted_by_trigger": triggers,
        "spread_s": round(times[-1] - times[0], 3) if len(times) == total else None,
        "first_after_current_s": round(times[0] - moved, 3) if times else None,
        "last_after_current_s": round(times[-1] - moved, 3) if times else None,
        "backends": {
            "before": steady,
            "peak": peak,
            "settled": settled,
            "ratio": round(peak / settled, 2) if peak and settled else None,
            "limit": total * (POOL_SIZE + MAX_OVERFLOW + 1),
            "series": sampler.series,
        },
        "requests": len(samples),
        "failures": sum(1 for s in samples if s.status is None or not 200 <= s.status < 300),
        "sm_calls": {k: v for k, v in calls.items() if k in SM_APIS},
        "sqs_calls": {k: v for k, v in calls.items() if k not in SM_APIS},
        "run_s": round(time.monotonic() - t0, 1),
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else str(x)


def markdown(doc: dict[str, Any]) -> str:
    """The fleet table: one row per mode."""
    lines = [
        f"Fleet: {INSTANCES} gunicorns x {WORKERS} gevent workers, one PostgreSQL, one secret, "
        f"{INSTANCES * CLIENTS_PER_INSTANCE} clients; {doc['started_at']}, {doc['wall_s']} s.",
        "",
        "| mode | adopted (by trigger) | spread s | first / last after AWSCURRENT s | backends before | "
        f"peak / settled (≤ {TARGET_PEAK_RATIO}) | failed / requests | Secrets Manager calls | SQS calls |",
        "|---|---|---:|---|---:|---|---:|---|---|",
    ]
    for r in doc["modes"]:
        b = r["backends"]
        by = ", ".join(f"{k} {v}" for k, v in sorted(r["adopted_by_trigger"].items()))
        sm = ", ".join(f"{k} {v}" for k, v in sorted(r["sm_calls"].items())) or "-"
        sqs = ", ".join(f"{k} {v}" for k, v in sorted(r["sqs_calls"].items())) or "-"
        lines.append(
            f"| {r['mode']} | {r['adopted']}/{r['workers']} ({by}) | {_fmt(r['spread_s'])} | "
            f"{_fmt(r['first_after_current_s'])} / {_fmt(r['last_after_current_s'])} | "
            f"{_fmt(b['before'])} | {_fmt(b['peak'])} / {_fmt(b['settled'])} = {_fmt(b['ratio'])} | "
            f"{r['failures']} / {r['requests']} | {sm} | {sqs} |"
        )
    return "\n".join(lines) + "\n"


def run(stack: BenchStack, out: Path) -> dict[str, Any]:
    """Every mode; writes fleet.md and fleet.json under ``out`` and returns the document."""
    started = time.monotonic()
    doc: dict[str, Any] = {"started_at": datetime.now().astimezone().isoformat(timespec="seconds")}
    doc["modes"] = [run_mode(stack, mode) for mode in MODES]
    doc["wall_s"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.md").write_text(markdown(doc))
    (out / "fleet.json").write_text(json.dumps(doc, indent=1))
    print(markdown(doc), flush=True)
    return doc
