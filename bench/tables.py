"""The markdown tables of a run: results, replica reads, targets, and notes (latest.md).

They render the document bench/report.py builds and compute nothing it does not hold,
except the median detection time of each scenario.
"""

from __future__ import annotations

from typing import Any

from bench.report import percent, percentile

__all__ = ["markdown"]


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"
    return str(x)


def _median(values: list[float]) -> float | None:
    return percentile(values, 50)


def markdown(doc: dict[str, Any]) -> str:
    """The results and targets tables, with how and where they were measured."""
    meta = doc["meta"]
    m = meta["machine"]
    lines = [
        f"Command: `{meta['command']}` — {meta['started_at']}, {meta['wall_s']} s wall time.",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, load average at start "
        f"{m['load_average_at_start']}; other work may have been running on this shared machine.",
        f"App: {meta['workers']} gevent workers (unless stated), refresh interval "
        f"{meta['refresh_interval_ms']} ms, grace {meta['grace_ms']} ms, JSON logs.",
        "",
        "| scenario | requests | ok rps | failed | p50 / p95 / p99 ms | p99 ±5 s of rotations | "
        "detection median s (n) | swap ms max | drain ms max | SM calls | Describe /worker-h @300 s | "
        "backends max / final (limit) | writes lost | dup |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in doc["scenarios"]:
        lat = r["latency_ms"]
        around = r["around_rotations_ms"]
        detection = ", ".join(
            f"{k} {_fmt((_median(v) or 0) / 1000)} ({len(v)})" for k, v in sorted(r["detection_ms"].items())
        )
        calls = ", ".join(
            f"{k.replace('Secret', '').replace('Value', '')} {v}" for k, v in sorted(r["sm_calls"].items())
        )
        b = r["backends"]
        lines.append(
            f"| {r['name']} | {r['requests']} | {_fmt(r['throughput_rps'])} | {r['failures']} | "
            f"{_fmt(lat['p50'])} / {_fmt(lat['p95'])} / {_fmt(lat['p99'])} | "
            f"{_fmt(around['p99']) if around else '–'} | {detection or '–'} | "
            f"{_fmt(max(r['swap_ms'], default=None))} | {_fmt(max(r['drained_ms'], default=None))} | "
            f"{calls or '–'} | {_fmt(r['sm_describe_per_worker_hour_at_300s'])} | "
            f"{_fmt(b['max'])} / {_fmt(b['final'])} ({b['limit']}) | "
            f"{r['writes']['lost']} of {r['writes']['created']} | {r['writes'].get('duplicates', 0)} |"
        )
    lines += _replica_table(doc["scenarios"])
    lines += _iam_table(doc["scenarios"])
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in doc["targets"]:
        verdict = "–" if t["ok"] is None else "yes" if t["ok"] else "**NO**"
        lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    notes = []
    for r in doc["scenarios"]:
        extra = {k: v for k, v in r["extra"].items() if k not in _NOT_NOTED}
        if extra:
            notes.append(f"- {r['name']}: " + ", ".join(f"{k} = {v}" for k, v in extra.items()))
        if r["failure_reasons"]:
            shown = "; ".join(f"{n}× `{k}`" for k, n in r["failure_reasons"].items())
            notes.append(f"- {r['name']} failures: {shown}")
        if r["app_errors"]:
            notes.append(
                f"- {r['name']}: {len(r['app_errors'])} unexpected error line(s) in the app log (see JSON)"
            )
        if r["app_events"]:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(r["app_events"].items()))
            notes.append(f"- {r['name']} app log: {shown}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# Extra values that only feed other figures (times of events, the statements' texts).
_NOT_NOTED = {
    "down_at_s",
    "writes_stopped_at_s",
    "moved_at_s",
    "up_at_s",
    "statements",
    "replica_down_at_s",
    "replica_stopped_at_s",
    "replica_up_at_s",
    # In the IAM table.
    "connects",
    "connects_per_s",
    "endpoint_refusals",
    "app_token_refusals",
    "tokens_signed_run",
    "tokens_signed_total",
    "sign_us_median",
    "tokens_in_log",
    "endpoint_cpu_ms_per_request",
}


def _replica_table(results: list[dict[str, Any]]) -> list[str]:
    """Reads by bind for the scenarios with a replica bind (nothing when none ran)."""
    rows = [r for r in results if r.get("replica_reads")]
    if not rows:
        return []
    lines = [
        "",
        "| scenario | reads replica / primary | replica share: run | around rotations | "
        "before / during / after standby down | back on replica s (counters; each worker) | "
        "standby backends max |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    for r in rows:
        reads = r["replica_reads"]
        phases = reads["phases"]
        run = phases["run"]
        around = phases.get("around_rotations")
        outage = (
            " / ".join(percent(phases[k]["share"]) for k in ("before", "during", "after"))
            if "during" in phases
            else "–"
        )
        back = "–"
        if "back_on_replica_s" in reads:
            workers = ", ".join(_fmt(t) for t in reads["workers_back_s"])
            back = f"{_fmt(reads['back_on_replica_s'])} ({workers or 'none logged'})"
        lines.append(
            f"| {r['name']} | {run['replica']} / {run['primary']} | {percent(run['share'])} | "
            f"{percent(around['share']) if around else '–'} | {outage} | {back} | "
            f"{_fmt(reads['standby_backends']['max'])} |"
        )
    return lines


def _iam_table(results: list[dict[str, Any]]) -> list[str]:
    """Logins through the IAM-checking endpoint (bench/iam.py); nothing when none ran."""
    rows = [r for r in results if "connects" in r["extra"]]
    if not rows:
        return []
    lines = [
        "",
        "| scenario (via the endpoint) | ok rps | p50 / p99 ms | failed | connects (per s of load) | "
        "tokens signed: run / total | signing µs median | endpoint CPU ms/request | refused logins |",
        "|---|---:|---|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        x, lat = r["extra"], r["latency_ms"]
        refused = {**x["endpoint_refusals"], **x["app_token_refusals"]}
        lines.append(
            f"| {r['name']} | {_fmt(r['throughput_rps'])} | {_fmt(lat['p50'])} / {_fmt(lat['p99'])} | "
            f"{r['failures']} | {x['connects']} ({_fmt(x['connects_per_s'])}) | "
            f"{x['tokens_signed_run']} / {x['tokens_signed_total']} | {_fmt(x['sign_us_median'])} | "
            f"{x['endpoint_cpu_ms_per_request']} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(refused.items())) or 0} |"
        )
    return lines
