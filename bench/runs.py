"""Running scenarios: one server per scenario, alone or interleaved with others, and its figures.

``launch`` starts a scenario's database, role, secret and gunicorn and warms it up;
``run_scenario`` loads it for the scenario's duration while its action runs;
``run_interleaved`` loads several at once, switching the load between them; ``finish``
takes the measurements. ``bench/rotation_bench.py`` is the command around them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench import iam, measure, report
from bench.iam_process import EndpointProcess
from bench.load import make_load
from bench.pinning import pin_load
from bench.replica import ReadsSampler, summarize_reads
from bench.scenarios import FAULT_SCENARIOS, Context, Scenario
from bench.stack import BackendSampler, BenchStack
from devstack import free_port
from devstack.processes import GunicornServer, LoadGenerator, LoadResult, Sample

__all__ = [
    "SCRUBBED",
    "Launched",
    "finish",
    "gunicorn_env",
    "launch",
    "run_interleaved",
    "run_pair",
    "run_scenario",
]

GRACE_MS = 3000
# The fault scenarios' clients send an Idempotency-Key with every post and retry a 503 once
# with it (rotation_bench --no-keys: the same retry without keys, to count what keys save).
CLIENT_KEYS = True
SMOKE_GRACE_MS = 1000
# Environment the bench must not inherit: it decides the app's credentials and endpoint.
SCRUBBED = (
    "DB_SECRET_ID",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "ADMIN_TOKEN",
    "ADMIN_TOKEN_SECRET_ID",
    "METRICS_TOKEN",
    "METRICS_TOKEN_SECRET_ID",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "GUNICORN_CMD_ARGS",
)


def gunicorn_env(
    stack: BenchStack, scenario: Scenario, ctx: Context, workers: int, interval_ms: int, workdir: Path
) -> dict[str, str]:
    """The app's environment for one scenario (only loopback endpoints)."""
    prometheus = workdir / "prometheus"
    prometheus.mkdir(exist_ok=True)
    pool = (scenario.pool_size, scenario.max_overflow)
    env = stack.app_env(ctx.db.name, prometheus, pool, interval_ms, SMOKE_GRACE_MS if ctx.smoke else GRACE_MS)
    if ctx.secret_arn:
        env["DB_SECRET_ID"] = ctx.secret_arn
    elif scenario.endpoint == "iam":
        pass  # no password: bench/iam.py's app_env names the login
    else:
        env.update(POSTGRES_USER=ctx.db.role, POSTGRES_PASSWORD=ctx.db.password)
    if ctx.replica is not None:
        env["DB_REPLICA_SECRET_ID"] = ctx.replica.arn  # the standby's host and port are in it
    if scenario.moves:
        assert stack.endpoint is not None
        env["POSTGRES_PORT"] = str(stack.endpoint.port)  # the name a failover or switchover moves
    return env


@dataclass
class Launched:
    """A scenario's gunicorn, booted and warmed up, with its database, secret and counters."""

    scenario: Scenario
    workers: int
    ctx: Context
    server: GunicornServer
    channels: list[int]
    warmup_ids: list[int]
    pids: list[int]
    prometheus_dir: Path
    cpu_before: float = 0.0
    sampler: BackendSampler | None = None
    # Replica scenarios: reads by bind over time, and the replica login's backends on the standby.
    reads: ReadsSampler | None = None
    standby_sampler: BackendSampler | None = None
    wall_t0: float = 0.0
    # Interleaved runs add up the workers' CPU over their own slices only (idle time excluded).
    slice_cpu_s: float | None = None
    statements_before: dict[str, int] = field(default_factory=dict)
    # The iam scenarios' endpoint process (bench/iam.py), and its counts when measuring began.
    endpoint: EndpointProcess | None = None
    endpoint_before: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop the gunicorn, then the endpoint in front of its database (if any)."""
        self.server.stop()
        if self.endpoint is not None:
            self.endpoint.stop()

    def begin(self, t0: float) -> None:
        """The measurement starts now: CPU baseline, backend sampling."""
        self.ctx.t0 = t0
        self.wall_t0 = time.time() - (time.monotonic() - t0)
        self.cpu_before = measure.process_cpu_s(self.pids)
        self.statements_before = self.ctx.stack.statements(self.ctx.db)
        if self.endpoint is not None:
            self.endpoint_before = self.endpoint.stats()
        self.sampler = BackendSampler(self.ctx.stack.cluster, self.ctx.db.roles, t0)
        self.sampler.start()
        replica = self.ctx.replica
        if replica is not None:
            self.reads = ReadsSampler(self.prometheus_dir, t0)
            self.reads.start()
            self.standby_sampler = BackendSampler(replica.standby, (replica.role,), t0)
            self.standby_sampler.start()

    def load(self, max_s: float) -> LoadGenerator:
        s = self.scenario
        fault = s.name in FAULT_SCENARIOS
        url, channels = self.server.url, self.channels
        keys = s.keys or (CLIENT_KEYS and fault)
        return make_load(url, channels, s.clients, max_s, s.path, s.reads_per_write, keys, fault)


def launch(stack: BenchStack, scenario: Scenario, workers: int, interval_ms: int, smoke: bool) -> Launched:
    """A fresh database, role, secret and gunicorn; the caller stops the server."""
    if scenario.moves:
        stack.movable()
    db = stack.new_database(scenario.name)
    arn = stack.create_secret(scenario.name, db) if scenario.secrets_manager else None
    if scenario.clone:
        stack.add_clone(db)
    replica = stack.add_replica_login(db) if scenario.replica else None
    ctx = Context(stack, db, arn, t0=0.0, smoke=smoke, replica=replica)
    ctx.passwords += stack.passwords()
    workdir = stack.workdir_for(scenario.name)
    env = {**gunicorn_env(stack, scenario, ctx, workers, interval_ms, workdir), **dict(scenario.env)}
    endpoint = None
    if scenario.endpoint is not None:
        endpoint = iam.start_endpoint(stack, db, scenario.endpoint, workdir)
        env.update(iam.app_env(stack, endpoint, db, scenario.endpoint))
    # Scenarios that load a bench-only route run the bench's entry point; the others the product's.
    entry = scenario.entry or ("bench.wsgi:app" if scenario.path else "wsgi:app")
    server = GunicornServer(
        env,
        free_port(),
        workers,
        workdir / "gunicorn.log",
        app=entry,
        monitor_blocking=scenario.name in FAULT_SCENARIOS,
    )
    print(f"[{scenario.name}] {scenario.description}: {scenario.clients} clients", flush=True)
    try:
        server.start(timeout_s=90)
        _wait_for_workers(server, workers, scenario.secrets_manager)
        channels = [] if scenario.path else _create_channels(server.url)
        warmup = _warm_up(server.url, channels, scenario, 0.5 if smoke else 3.0)
    except BaseException:
        server.stop()
        if endpoint is not None:
            endpoint.stop()
        raise
    pids = measure.worker_pids(server.output())
    prometheus = workdir / "prometheus"
    return Launched(scenario, workers, ctx, server, channels, warmup, pids, prometheus, endpoint=endpoint)


def finish(
    run: Launched,
    result: LoadResult,
    elapsed_s: float,
    calls: dict[str, int],
    bench_cpu_s: float,
    interval_ms: int,
    wall_s: float | None = None,
) -> dict[str, Any]:
    """Backends after the grace period (the caller waited), lost writes, logs: the summary."""
    assert run.sampler is not None
    worker_cpu_s = (
        run.slice_cpu_s if run.slice_cpu_s is not None else measure.process_cpu_s(run.pids) - run.cpu_before
    )
    # A move replaces the server: its statement counts are another server's (none reported).
    statements = (
        {} if run.scenario.moves else _delta(run.ctx.stack.statements(run.ctx.db), run.statements_before)
    )
    final_backends = run.sampler.count_now()
    run.sampler.stop()
    reads = None
    if run.reads is not None and run.standby_sampler is not None:
        run.reads.stop()
        run.standby_sampler.stop()
        resumed = measure.event_times(run.server.output(), "replica_reads_resumed", run.wall_t0)
        reads = summarize_reads(run.reads.series, run.ctx.rotations, run.ctx.extra, resumed)
        standby = [n for _, n in run.standby_sampler.series]
        reads["standby_backends"] = {"max": max(standby, default=None), "series": run.standby_sampler.series}
    lost = run.ctx.stack.missing_ids(run.ctx.db, run.warmup_ids + result.created_ids)
    duplicates = run.ctx.stack.duplicate_writes(run.ctx.db)
    if run.endpoint is not None:
        after = run.endpoint.stats()
        run.ctx.extra.update(
            iam.figures(
                run.endpoint_before, after, elapsed_s, len(result.samples), run.server.output(), run.wall_t0
            )
        )
    run.stop()
    if run.scenario.name in FAULT_SCENARIOS:
        run.ctx.extra["blocking_reports"] = len(run.server.blocking_reports())
    made = max(1, len(result.samples))
    run.ctx.extra["worker_cpu_ms_per_request"] = round(worker_cpu_s * 1000 / made, 2)
    run.ctx.extra["bench_cpu_ms_per_request"] = round(bench_cpu_s * 1000 / made, 2)
    if statements:
        run.ctx.extra["statements_per_request"] = round(sum(statements.values()) / made, 2)
        ranked = sorted(statements.items(), key=lambda kv: -kv[1])
        run.ctx.extra["statements"] = {query: round(calls / made, 3) for query, calls in ranked}
    return report.summarize(
        scenario=run.scenario,
        workers=run.workers,
        interval_ms=interval_ms,
        elapsed_s=elapsed_s,
        sm_elapsed_s=wall_s or elapsed_s,
        result=result,
        ctx=run.ctx,
        calls=calls,
        backends=run.sampler.series,
        final_backends=final_backends,
        lost_writes=lost,
        duplicate_writes=duplicates,
        app_events=measure.app_log_events(run.server.output()),
        replica_reads=reads,
        passwords_in_log=measure.passwords_in(run.server.output(), run.ctx.passwords),
    )


def _settle(smoke: bool) -> None:
    """Wait out the grace period: old pools are closed by then."""
    time.sleep((SMOKE_GRACE_MS if smoke else GRACE_MS) / 1000 + 1.0)


def run_scenario(
    stack: BenchStack,
    scenario: Scenario,
    workers: int,
    interval_ms: int,
    smoke: bool,
    pin_load_cpu: int | None = None,
) -> dict[str, Any]:
    """Load one gunicorn for the scenario's duration while its action runs."""
    duration_s = scenario.smoke_duration_s if smoke else scenario.duration_s
    run = launch(stack, scenario, workers, interval_ms, smoke)
    if pin_load_cpu is not None:
        postmaster = int((stack.cluster.datadir / "postmaster.pid").read_text().split()[0])
        run.ctx.extra["pinning"] = pin_load(pin_load_cpu, (postmaster,))
    try:
        load = run.load(duration_s + 60)
        stack.moto.take_calls()  # start-up fetches are not part of the measurement
        bench_before = measure.self_cpu_s()
        run.begin(time.monotonic())
        load.start()
        try:
            if scenario.action is not None:
                scenario.action(run.ctx)
            run.ctx.sleep_until(duration_s)
        finally:
            result = load.stop()
        elapsed = time.monotonic() - run.ctx.t0
        bench_cpu = measure.self_cpu_s() - bench_before
        calls = stack.moto.take_calls()
        _settle(smoke)
        return finish(run, result, elapsed, calls, bench_cpu, interval_ms)
    finally:
        run.stop()


def run_pair(
    stack: BenchStack, a: Scenario, b: Scenario, workers: int, interval_ms: int, slice_s: float = 2.0
) -> list[dict[str, Any]]:
    """``a`` and ``b`` both running, the load switched between them every ``slice_s``."""
    return run_interleaved(stack, [a, b], workers, interval_ms, slice_s)


def run_interleaved(
    stack: BenchStack,
    scenarios: Sequence[Scenario],
    workers: int,
    interval_ms: int,
    slice_s: float = 2.0,
    duration_s: float | None = None,
) -> list[dict[str, Any]]:
    """Every scenario running at once, the load switched from one to the next every ``slice_s``.

    Cycles alternate direction (A B C, C B A, ...). On a shared machine a burst of other
    work lands on all alike, so throughput ratios
    compare like with like. Each one's timeline has only its own slices, and its worker
    CPU is counted over its own slices only. Each gets ``duration_s`` (default: the
    first scenario's duration) of load.
    """
    runs: list[Launched] = []
    try:
        for scenario in scenarios:
            runs.append(launch(stack, scenario, scenario.workers or workers, interval_ms, False))
        n = len(runs)
        results = [LoadResult() for _ in runs]
        on_s = [0.0] * n
        cpu = [0.0] * n
        stack.moto.take_calls()
        t0 = time.monotonic()
        for run in runs:
            run.begin(t0)
            run.slice_cpu_s = 0.0
        for k in range(n * max(1, round((duration_s or scenarios[0].duration_s) / slice_s))):
            # Every other cycle runs backwards (A B, B A, A B, ...): each one follows each
            # other one, and itself, equally often, so whatever a slice inherits from the
            # one before it lands on all alike.
            cycle, step = divmod(k, n)
            i = step if cycle % 2 == 0 else n - 1 - step
            run = runs[i]
            load = run.load(slice_s + 60)
            started, bench_before = time.monotonic(), measure.self_cpu_s()
            workers_before = measure.process_cpu_s(run.pids)
            load.start()
            time.sleep(slice_s)
            part = load.stop()
            assert run.slice_cpu_s is not None
            run.slice_cpu_s += measure.process_cpu_s(run.pids) - workers_before
            shift = t0 + on_s[i] - started  # lay this scenario's slices end to end
            results[i].samples += [
                Sample(s.started + shift, s.duration_ms, s.status, s.error) for s in part.samples
            ]
            results[i].created_ids += part.created_ids
            on_s[i] += time.monotonic() - started
            cpu[i] += measure.self_cpu_s() - bench_before
        wall = time.monotonic() - t0
        calls = stack.moto.take_calls()  # only the watched one asks Secrets Manager
        _settle(False)
        watched = [run for run in runs if run.scenario.secrets_manager]
        return [
            finish(
                run,
                results[i],
                on_s[i],
                calls if run.scenario.secrets_manager and len(watched) == 1 else {},
                cpu[i],
                interval_ms,
                wall,
            )
            for i, run in enumerate(runs)
        ]
    finally:
        for run in runs:
            run.stop()


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Calls per statement text between two snapshots (only the ones that ran)."""
    return {q: n - before.get(q, 0) for q, n in after.items() if n - before.get(q, 0) > 0}


def _wait_for_workers(server: GunicornServer, workers: int, watched: bool, timeout_s: float = 60.0) -> None:
    """Until every worker has booted (its start-up fetch must not count as load-time calls)."""
    needle = '"auto_refresh_started"' if watched else '"secret_watcher_disabled"'
    deadline = time.monotonic() + timeout_s
    while server.output().count(needle) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not every gunicorn worker booted within {timeout_s:.0f} s: see {server.logfile}"
            )
        time.sleep(0.2)


def _warm_up(url: str, channels: list[int], scenario: Scenario, seconds: float) -> list[int]:
    """Load not measured (first connections, first imports); returns the ids it created."""
    load = make_load(url, channels, scenario.clients, seconds, scenario.path, scenario.reads_per_write)
    load.start()
    time.sleep(seconds)
    return load.stop().created_ids


def _create_channels(url: str) -> list[int]:
    with requests.Session() as session:
        return [
            int(session.post(f"{url}/api/channels", json={"name": f"bench-{i}"}, timeout=10).json()["id"])
            for i in range(3)
        ]
