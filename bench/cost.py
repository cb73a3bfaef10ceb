"""`make bench-cost`: what each per-request feature costs, next to a bare Flask-SQLAlchemy port.

Every variant runs at once (fresh database, role and gunicorn each, 2 gevent workers,
pool 5 without overflow, 16 clients posting a message then reading a channel's 20
newest) and the load moves from one to the next every 2 s, so that other work on the
machine lands on all of them alike. That is one round; ``--runs`` rounds (fresh servers
each) give the spread.

- ``service``: the product's ``wsgi:app``, every feature on;
- ``service+keys``: the same, every POST with an ``Idempotency-Key`` (a new one each);
- ``baseline``: ``bench/baseline_wsgi.py``, the bare port (the yardstick);
- ``-X``: ``bench/feature_wsgi.py`` with ``BENCH_WITHOUT=X``: the product minus X.

Per variant: throughput, client p50/p99, worker CPU ms per request (user + system of the
workers over their own slices, /proc), and statements per request counted by
PostgreSQL (pg_stat_statements). The cost of a feature is service minus service-without-
it, round by round. Writes ``bench/results/cost.md`` and ``cost.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import measure
from bench.features import FEATURES
from bench.runs import SCRUBBED, run_interleaved
from bench.scenarios import SCENARIOS, Scenario
from bench.stack import BenchStack
from devstack.processes import ROOT

__all__ = ["main", "variants"]

# The watcher's poll is not a per-request cost: poll rarely, so it does not blur the CPU figures.
INTERVAL_MS = 60_000
DEFAULT_WITHOUT = FEATURES


def variants(without: Sequence[str], duration_s: float) -> list[Scenario]:
    """service, baseline, then the service without each feature (and without all of them)."""
    service = dataclasses.replace(SCENARIOS["service"], duration_s=duration_s)
    keyed = dataclasses.replace(
        service, name="service+keys", description="the service, every POST with an Idempotency-Key", keys=True
    )
    out = [service, keyed, dataclasses.replace(SCENARIOS["baseline"], duration_s=duration_s)]
    groups = [[name] for name in without]
    if len(without) > 1:
        groups.append(list(without))
    for group in groups:
        label = "-all" if len(group) > 1 else f"-{group[0]}"
        out.append(
            dataclasses.replace(
                service,
                name=label,
                description=f"the service without {', '.join(group)}",
                entry="bench.feature_wsgi:app",
                env=(("BENCH_WITHOUT", ",".join(group)),),
            )
        )
    return out


def _figures(r: dict[str, Any]) -> dict[str, Any]:
    extra = r["extra"]
    return {
        "rps": r["throughput_rps"],
        "p50": r["latency_ms"]["p50"],
        "p99": r["latency_ms"]["p99"],
        "cpu_ms": extra.get("worker_cpu_ms_per_request"),
        "stmts": extra.get("statements_per_request"),
        "failures": r["failures"],
        "lost": r["writes"]["lost"],
        "statements": extra.get("statements", {}),
    }


def _spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    fmt = (
        (lambda x: f"{x:.0f}") if abs(med) >= 100 else (lambda x: f"{x:.2f}" if abs(med) < 10 else f"{x:.1f}")
    )
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})" if len(values) > 1 else fmt(med)


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and per feature, the median and range over the rounds."""
    names = list(rounds[0])
    table = {}
    for name in names:
        rows = [rnd[name] for rnd in rounds]
        table[name] = {k: [row[k] for row in rows] for k in ("rps", "p50", "p99", "cpu_ms", "stmts")}
        table[name]["failures"] = sum(row["failures"] for row in rows)
        table[name]["lost"] = sum(row["lost"] for row in rows)
    costs = {}
    for name in names:
        if not name.startswith("-"):
            continue
        costs[name[1:]] = {
            "cpu_us": [round((rnd["service"]["cpu_ms"] - rnd[name]["cpu_ms"]) * 1000) for rnd in rounds],
            "rps_pct": [round((rnd[name]["rps"] / rnd["service"]["rps"] - 1) * 100, 1) for rnd in rounds],
            "stmts": [round(rnd["service"]["stmts"] - rnd[name]["stmts"], 2) for rnd in rounds],
        }
    ratio = [round(rnd["service"]["rps"] / rnd["baseline"]["rps"], 3) for rnd in rounds]
    # Half the requests are POSTs (post, then read): a keyed POST's cost is twice the delta.
    keyed = {
        "cpu_us": [
            round((rnd["service+keys"]["cpu_ms"] - rnd["service"]["cpu_ms"]) * 2000) for rnd in rounds
        ],
        "rps_pct": [
            round((rnd["service+keys"]["rps"] / rnd["service"]["rps"] - 1) * 100, 1) for rnd in rounds
        ],
        "stmts": [round((rnd["service+keys"]["stmts"] - rnd["service"]["stmts"]) * 2, 2) for rnd in rounds],
    }
    return {"variants": table, "costs": costs, "keyed_post": keyed, "service_over_baseline_rps": ratio}


def markdown(doc: dict[str, Any]) -> str:
    meta, s = doc["meta"], doc["summary"]
    m = meta["machine"]
    lines = [
        f"Command: `{meta['command']}` — {meta['started_at']}, {meta['wall_s']} s wall time, "
        f"{meta['runs']} rounds of {meta['duration_s']} s per variant, interleaved every 2 s.",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, load average at start "
        f"{m['load_average_at_start']}. Figures: median (min-max) over the rounds.",
        "",
        f"**service / baseline throughput: {_spread(s['service_over_baseline_rps'])}** (target >= 0.97)",
        "",
        "| variant | ok rps | p50 ms | p99 ms | worker CPU ms/request | statements/request | failed | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in s["variants"].items():
        lines.append(
            f"| {name} | {_spread(v['rps'])} | {_spread(v['p50'])} | {_spread(v['p99'])} | "
            f"{_spread(v['cpu_ms'])} | {_spread(v['stmts'])} | {v['failures']} | {v['lost']} |"
        )
    lines += [
        "",
        "| feature | worker CPU µs/request | throughput without it | statements/request |",
        "|---|---:|---:|---:|",
    ]
    for name, c in s["costs"].items():
        lines.append(
            f"| {name} | {_spread(c['cpu_us'])} | {_spread(c['rps_pct'])} % | {_spread(c['stmts'])} |"
        )
    k = s["keyed_post"]
    lines += [
        "",
        f"**A POST with an Idempotency-Key** (service+keys against service; per POST): "
        f"{_spread(k['stmts'])} statements more (target <= 1, in the same message: no round trip), "
        f"{_spread(k['cpu_us'])} µs of worker CPU more, throughput {_spread(k['rps_pct'])} %.",
    ]
    first = doc["rounds"][0]
    for name in ("service", "service+keys", "baseline"):
        lines += ["", f"Statements per request, {name} (round 1):", ""]
        for query, calls in first[name]["statements"].items():
            lines.append(f"- {calls:.2f} x `{' '.join(query.split())[:110]}`")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="rounds (fresh servers each)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per variant per round")
    parser.add_argument(
        "--without",
        action="append",
        choices=FEATURES,
        help=f"features to measure one by one (repeatable; default {', '.join(DEFAULT_WITHOUT)})",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    for name in SCRUBBED:
        os.environ.pop(name, None)
    command = " ".join(["python -m bench.cost", *(sys.argv[1:] if argv is None else argv)]).strip()
    meta = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": measure.machine(),
        "runs": args.runs,
        "duration_s": args.duration,
        "refresh_interval_ms": INTERVAL_MS,
    }
    started = time.monotonic()
    rounds: list[dict[str, dict[str, Any]]] = []
    stack = BenchStack()
    try:
        stack.open()
        for n in range(args.runs):
            print(f"round {n + 1} of {args.runs}", flush=True)
            order = variants(args.without or DEFAULT_WITHOUT, args.duration)
            # Each round starts the cycle at another variant: the first slice of a round
            # ran 0.4-1.1 ms/request dearer than the same app later in that round (a control
            # variant, the service under another entry point, showed it), and with the
            # service always first every feature looked that much dearer.
            start = n % len(order)
            results = run_interleaved(stack, order[start:] + order[:start], 2, INTERVAL_MS)
            rounds.append({r["name"]: _figures(r) for r in results})
    finally:
        stack.close()
    meta["wall_s"] = round(time.monotonic() - started, 1)
    doc = {"meta": meta, "rounds": rounds, "summary": summarize(rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.json").write_text(json.dumps(doc, indent=1))
    (args.out / "cost.md").write_text(markdown(doc))
    print(markdown(doc), flush=True)
    print(f"written: {args.out / 'cost.md'}, {args.out / 'cost.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
