"""Turning one run's samples into numbers: the JSON document ``build`` returns, targets included.

bench/tables.py renders that document as markdown tables, bench/plots.py as a PNG.

Definitions (also in the README's Performance section):
- a failure is any non-2xx answer or transport error;
- latency percentiles are over every request, failed ones included;
- "±5 s of rotations" is every request started from 5 s before AWSPENDING was written
  to 5 s after AWSCURRENT moved, over all rotations of the scenario;
- Secrets Manager calls are counted at the (moto) server by API, the bench's own excluded;
  per worker-hour at the 5-minute default = measured DescribeSecret per worker-hour x
  (refresh interval / 300 s) (polls scale with the interval), plus GetSecretValue per
  worker per rotation x 1/168 (RDS rotates every 7 days);
- writes lost = 201-acknowledged message ids without a row, read back with SQL;
- duplicate writes = messages stored more than once (every post's body is unique to it);
  the rotation and fault scenarios' clients send an Idempotency-Key with every post and
  retry a 503 once with it (``--no-keys``: without keys, the same retry);
- passwords in the log = how many of the passwords the app was given (and the stack's
  own) appear in gunicorn's captured output, as they are or URL-encoded;
- replica share = reads served by the replica bind / all reads of the read-only routes,
  from the workers' ``commng_db_reads_total{bind}`` counters (bench/replica.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from bench.measure import percentile
from bench.move_figures import move_figures
from bench.scenarios import FAULT_SCENARIOS, Context, Scenario
from devstack.processes import LoadResult

__all__ = ["build", "percent", "percentile", "summarize", "targets"]

DEFAULT_INTERVAL_S = 300.0
ROTATIONS_PER_HOUR = 1 / (7 * 24)
CONCURRENCY_LIMIT_RPS = 400.0


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": _round(percentile(values, q)) for q in (50, 95, 99)}


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _failed(status: int | None) -> bool:
    return status is None or not 200 <= status < 300


def summarize(
    *,
    scenario: Scenario,
    workers: int,
    interval_ms: int,
    elapsed_s: float,
    sm_elapsed_s: float,
    result: LoadResult,
    ctx: Context,
    calls: dict[str, int],
    backends: list[tuple[float, int]],
    final_backends: int | None,
    lost_writes: int,
    duplicate_writes: int = 0,
    app_events: dict[str, Any],
    replica_reads: dict[str, Any] | None = None,
    passwords_in_log: int = 0,
) -> dict[str, Any]:
    """Everything reported for one scenario, JSON-ready."""
    t0 = ctx.t0
    samples = result.samples
    failures = [s for s in samples if _failed(s.status)]
    reasons = Counter(f"{s.status or 'transport'}: {s.error or ''}"[:120] for s in failures)
    windows = [(r["start"] - 5, r["end"] + 5) for r in ctx.rotations]
    around = [s.duration_ms for s in samples if any(a <= s.started - t0 <= b for a, b in windows)]
    ok = len(samples) - len(failures)
    worker_hours = workers * sm_elapsed_s / 3600  # the watcher polls whether loaded or not
    describe = calls.get("DescribeSecret", 0)
    gets = calls.get("GetSecretValue", 0)
    gets_per_rotation = gets / (workers * len(ctx.rotations)) if ctx.rotations else None
    summary: dict[str, Any] = {
        "name": scenario.name,
        "description": scenario.description,
        "secrets_manager": scenario.secrets_manager,
        "workers": workers,
        "pool_size": scenario.pool_size,
        "max_overflow": scenario.max_overflow,
        "clients": scenario.clients,
        "duration_s": round(elapsed_s, 2),
        "requests": len(samples),
        "failures": len(failures),
        "failure_reasons": dict(reasons.most_common(5)),
        "throughput_rps": round(ok / elapsed_s, 1),
        "latency_ms": _pcts([s.duration_ms for s in samples]),
        "around_rotations_ms": _pcts(around) if around else None,
        "rotations": ctx.rotations,
        "marks": ctx.marks,
        "detection_ms": app_events["detection_ms"],
        "swap_ms": app_events["swap_ms"],
        "drained_ms": app_events["drained_ms"],
        "app_events": app_events["counts"],
        "app_errors": app_events["errors"],
        "sm_calls": calls,
        "sm_describe_per_worker_hour_at_300s": (
            round(describe / worker_hours * interval_ms / 1000 / DEFAULT_INTERVAL_S, 2)
            if scenario.secrets_manager
            else None
        ),
        "sm_get_per_worker_per_rotation": _round(gets_per_rotation, 2),
        "backends": {
            "max": max((n for _, n in backends), default=None),
            "final": final_backends,
            # The pools, plus one LISTEN connection per worker where a secret is watched (fan-out).
            "limit": workers * (scenario.pool_size + (1 if scenario.secrets_manager else 0)),
            "series": backends,
        },
        "writes": {
            "created": len(result.created_ids),
            "lost": lost_writes,
            "duplicates": duplicate_writes,
            "retried_503": result.retried,
        },
        "passwords_in_log": passwords_in_log,
        "replica_reads": replica_reads,
        "timeline": _timeline(result, t0, elapsed_s),
        "extra": dict(ctx.extra),
    }
    if scenario.path:
        summary["extra"]["fraction_of_limit"] = round(summary["throughput_rps"] / CONCURRENCY_LIMIT_RPS, 3)
        cpu_ms = ctx.extra.get("worker_cpu_ms_per_request")
        if cpu_ms:
            # What one worker could serve if the CPU, not the pool, were the only limit.
            summary["extra"]["worker_cpu_ceiling_rps"] = round(workers * 1000 / cpu_ms)
    summary["extra"].update(move_figures(result, t0, ctx.extra))
    if "up_at_s" in ctx.extra:
        up = float(ctx.extra["up_at_s"])
        ends = [s.started - t0 + s.duration_ms / 1000 for s in failures]
        summary["extra"]["db_down_s"] = round(up - float(ctx.extra["down_at_s"]), 2)
        summary["extra"]["recovery_s"] = round(max([0.0, *(e - up for e in ends)]), 2)
        summary["extra"]["failures_after_up"] = sum(1 for e in ends if e > up)
        # Requests that were in flight at any time while PostgreSQL was down: they waited it out.
        down = float(ctx.extra["down_at_s"])
        during = [
            s.duration_ms
            for s in result.samples
            if s.started - t0 < up and s.started - t0 + s.duration_ms / 1000 > down
        ]
        summary["extra"]["outage_requests"] = len(during)
        summary["extra"]["outage_p99_ms"] = _round(percentile(during, 99))
    return summary


def _timeline(result: LoadResult, t0: float, elapsed_s: float) -> dict[str, list[Any]]:
    """Per-second completed requests and p99 (by completion time), and failure times."""
    bins: dict[int, list[float]] = {}
    fails: list[float] = []
    for s in result.samples:
        end = s.started - t0 + s.duration_ms / 1000
        bins.setdefault(int(end), []).append(s.duration_ms)
        if _failed(s.status):
            fails.append(round(end, 2))
    seconds = list(range(int(elapsed_s)))  # whole seconds only: the last one is partial
    return {
        "t": seconds,
        "rps": [len(bins.get(t, [])) for t in seconds],
        "p99_ms": [_round(percentile(bins.get(t, []), 99)) for t in seconds],
        "failures_t": fails,
    }


def _by_name(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in results}


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets next to the measured values (only for scenarios that ran)."""
    by = _by_name(results)
    rows: list[dict[str, Any]] = []

    def add(target: str, measured: Any, ok: bool | None, note: str = "") -> None:
        rows.append({"target": target, "measured": measured, "ok": ok, "note": note})

    for name in FAULT_SCENARIOS:
        if name in by:
            add(f"{name}: failed requests = 0", by[name]["failures"], by[name]["failures"] == 0)
    blocked = {r["name"]: r["extra"]["blocking_reports"] for r in results if "blocking_reports" in r["extra"]}
    if blocked:
        add(
            "greenlets that held a worker's loop > 100 ms = 0 (rotation and fault scenarios)",
            sum(blocked.values()),
            not any(blocked.values()),
        )
    lost = {r["name"]: r["writes"]["lost"] for r in results}
    add("lost writes = 0 (every scenario)", sum(lost.values()), not any(lost.values()))
    duplicates = {r["name"]: r["writes"].get("duplicates", 0) for r in results}
    add("duplicate writes = 0 (every scenario)", sum(duplicates.values()), not any(duplicates.values()))
    leaked = sum(r.get("passwords_in_log", 0) for r in results)
    add("passwords in the app log = 0 (every scenario)", leaked, leaked == 0)
    for r in results:
        reads = r.get("replica_reads")
        if reads:
            share = reads["phases"]["run"]["share"]
            # No target for the share: > 0 only shows that the replica bind served at all.
            add(f"{r['name']}: share of reads served by the replica", percent(share), bool(share))
    if "replica-down" in by and by["replica-down"]["replica_reads"]:
        back = by["replica-down"]["replica_reads"].get("back_on_replica_s")
        add("replica-down: reads back on the replica, s after the standby accepts", back, None, "no target")
    if "steady" in by and "static" in by and by["static"]["throughput_rps"]:
        ratio = by["steady"]["throughput_rps"] / by["static"]["throughput_rps"]
        add("steady / static throughput >= 0.97", round(ratio, 3), ratio >= 0.97)
    if "service" in by and "baseline" in by and by["baseline"]["throughput_rps"]:
        ratio = by["service"]["throughput_rps"] / by["baseline"]["throughput_rps"]
        add("service / baseline throughput >= 0.97", round(ratio, 3), ratio >= 0.97)
    if "iam" in by and "iam-password" in by and by["iam-password"]["throughput_rps"]:
        ratio = by["iam"]["throughput_rps"] / by["iam-password"]["throughput_rps"]
        add("iam / iam-password throughput >= 0.97 (same endpoint)", round(ratio, 3), ratio >= 0.97)
    for r in results:
        if "endpoint_refusals" in r["extra"]:
            refused = {**r["extra"]["endpoint_refusals"], **r["extra"]["app_token_refusals"]}
            shown = ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or 0
            add(f"{r['name']}: refused logins = 0 (by cause)", shown, not refused)
            tokens = r["extra"]["tokens_in_log"]
            add(f"{r['name']}: IAM tokens in the app log = 0", tokens, tokens == 0)
    steady_p99 = by.get("steady", {}).get("latency_ms", {}).get("p99")
    for r in results:
        around = r.get("around_rotations_ms")
        if steady_p99 and around and around["p99"] is not None:
            ratio = around["p99"] / steady_p99
            add(f"{r['name']}: p99 ±5 s of rotations / steady p99 <= 1.5", round(ratio, 2), ratio <= 1.5)
    worst = [r for r in results if r["backends"]["final"] is not None]
    if worst:
        over = [r["name"] for r in worst if r["backends"]["final"] > r["backends"]["limit"]]
        shown = ", ".join(f"{r['name']} {r['backends']['final']}/{r['backends']['limit']}" for r in worst)
        add("final backends <= workers x (pool + 1 listener)", shown, not over)
    if "steady" in by and by["steady"]["sm_describe_per_worker_hour_at_300s"] is not None:
        polls = by["steady"]["sm_describe_per_worker_hour_at_300s"]
        per_rotation = by.get("rotate", {}).get("sm_get_per_worker_per_rotation") or 0.0
        projected = polls + per_rotation * ROTATIONS_PER_HOUR
        add("Secrets Manager calls per worker-hour at 300 s <= 13", round(projected, 2), projected <= 13)
    if "concurrency" in by:
        fraction = by["concurrency"]["extra"]["fraction_of_limit"]
        add("concurrency >= 80 % of pool/latency (400 rps)", f"{fraction:.0%}", fraction >= 0.8)
    if "db-restart" in by:
        recovery = by["db-restart"]["extra"].get("recovery_s")
        add(
            "db-restart recovery <= 5 s after PostgreSQL accepts",
            recovery,
            recovery is not None and recovery <= 5,
        )
    return rows


def percent(share: float | None) -> str:
    """A share as a whole percentage (a dash when there is none), in targets and tables."""
    return "–" if share is None else f"{share:.0%}"


def build(meta: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole run as one JSON document."""
    return {"meta": meta, "scenarios": results, "targets": targets(results)}
