"""`make soak`: the service under steady load for a long time, with faults on a schedule,
and what each worker holds sampled every 10 s. `python -m bench.soak --help`.

The schedule (from the start of the load; each repeats until the end):
- a rotation every 60 s, single-user and alternating-users in turn;
- the app's idle backends terminated every 90 s;
- Secrets Manager (moto) down for 20 s every 10 minutes, from minute 5;
- PostgreSQL stopped (fast) for 3 s every 10 minutes, from minute 8.
Actions run one after another: one that falls due while another runs waits for it.

Sampled every 10 s, by a greenlet in each worker (``bench/soak_wsgi.py``): resident memory,
open descriptors, greenlets, engines and pools; and by the soak, the app's backends. The
verdict compares the last two thirds of the run: RSS grows < 2 %, and descriptors,
greenlets and backends stay flat (the last third's mean within a small margin of the
middle third's). Writes ``bench/results/soak.{md,json}`` and ``docs/soak.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import measure
from bench.runs import SCRUBBED, launch
from bench.scenarios import Context, Scenario
from bench.stack import BenchStack
from devstack.processes import ROOT

SAMPLE_S = 10.0
# What "flat" allows between the middle and the last third (means of the samples).
FLAT_MARGIN = {"fds": 2.0, "greenlets": 5.0, "backends": 2.0}
RSS_GROWTH_MAX = 0.02


@dataclass
class Every:
    """An action due at ``first_s``, then every ``period_s``."""

    name: str
    first_s: float
    period_s: float
    run: Callable[[Context, int], None]
    due_s: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.due_s = self.first_s


def _rotate(ctx: Context, n: int) -> None:
    if n % 2 == 0:
        ctx.rotate()
    else:
        ctx.rotate_alternating()


def _kill_idle(ctx: Context, n: int) -> None:
    killed = sum(ctx.stack.cluster.terminate_backends(role) for role in ctx.db.roles)
    ctx.mark(f"killed {killed} idle")


def _secrets_outage(ctx: Context, n: int) -> None:
    ctx.stack.moto.stop()
    ctx.mark("moto down")
    time.sleep(20.0)
    ctx.stack.moto.start()
    ctx.mark("moto back")


def _restart(ctx: Context, n: int) -> None:
    ctx.stack.cluster.stop("fast")
    ctx.mark("PostgreSQL down")
    time.sleep(3.0)
    ctx.stack.cluster.start()
    ctx.mark("PostgreSQL up")


def schedule(scale: float) -> list[Every]:
    """The soak's actions; ``scale`` shortens every offset and period (a quick trial run)."""
    return [
        Every("rotation", 30 * scale, 60 * scale, _rotate),
        Every("kill idle", 45 * scale, 90 * scale, _kill_idle),
        Every("secrets outage", 300 * scale, 600 * scale, _secrets_outage),
        Every("restart", 480 * scale, 600 * scale, _restart),
    ]


def drive(ctx: Context, actions: list[Every], duration_s: float, stop: threading.Event) -> None:
    """Run each action when due, one at a time, until ``duration_s``."""
    while not stop.is_set():
        nxt = min(actions, key=lambda a: a.due_s)
        if nxt.due_s >= duration_s:
            return
        if stop.wait(max(0.0, nxt.due_s - ctx.now())):
            return
        nxt.run(ctx, nxt.count)
        nxt.count += 1
        nxt.due_s += nxt.period_s


class Sampler:
    """Every SAMPLE_S: the workers' latest lines and the app's backends, into ``rows``."""

    def __init__(self, ctx: Context, directory: Path) -> None:
        self.ctx = ctx
        self.directory = directory
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            workers = {}
            for path in sorted(self.directory.glob("*.jsonl")):
                lines = path.read_text().splitlines()
                if lines:
                    workers[path.stem] = json.loads(lines[-1])
            try:
                backends: int | None = sum(self.ctx.stack.cluster.backend_count(r) for r in self.ctx.db.roles)
            except Exception:  # PostgreSQL is restarting
                backends = None
            self.rows.append({"t": round(self.ctx.now(), 1), "workers": workers, "backends": backends})


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(t, value) of ``key``: summed over the workers, or the backends."""
    out = []
    for row in rows:
        if key == "backends":
            if row["backends"] is not None:
                out.append((row["t"], float(row["backends"])))
        elif row["workers"]:
            out.append((row["t"], float(sum(w[key] for w in row["workers"].values()))))
    return out


def verdict(rows: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Growth over the last two thirds: RSS in %, the others as the change of their means."""
    third = duration_s / 3
    found: dict[str, Any] = {}
    for key in ("rss_bytes", "fds", "greenlets", "backends", "engines"):
        series = _series(rows, key)
        middle = [v for t, v in series if third <= t < 2 * third]
        last = [v for t, v in series if t >= 2 * third]
        if not middle or not last:
            found[key] = {"ok": None}
            continue
        a, b = statistics.fmean(middle), statistics.fmean(last)
        entry: dict[str, Any] = {"middle_mean": round(a, 1), "last_mean": round(b, 1)}
        if key == "rss_bytes":
            start = series[next(i for i, (t, _) in enumerate(series) if t >= third)][1]
            end = statistics.fmean(v for _, v in series[-3:])
            entry["growth"] = round((end - start) / start, 4)
            entry["ok"] = entry["growth"] < RSS_GROWTH_MAX
        elif key in FLAT_MARGIN:
            entry["ok"] = b - a <= FLAT_MARGIN[key]
        found[key] = entry
    return found


def plot(rows: list[dict[str, Any]], marks: list[dict[str, Any]], path: Path) -> None:
    """RSS per worker, descriptors, greenlets and backends over the run, with the faults."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 9), sharex=True)
    pids = sorted({pid for row in rows for pid in row["workers"]})
    for pid in pids:
        points = [(r["t"], r["workers"][pid]["rss_bytes"] / 2**20) for r in rows if pid in r["workers"]]
        axes[0].plot([t for t, _ in points], [v for _, v in points], lw=1, label=f"worker {pid}")
    axes[0].set_ylabel("RSS MiB")
    axes[0].legend(fontsize=7, loc="lower right")
    for ax, key, label in ((axes[1], "fds", "descriptors"), (axes[2], "greenlets", "greenlets")):
        series = _series(rows, key)
        ax.plot([t for t, _ in series], [v for _, v in series], lw=1)
        ax.set_ylabel(f"{label} (all workers)", fontsize=8)
    series = _series(rows, "backends")
    axes[3].plot([t for t, _ in series], [v for _, v in series], lw=1, color="tab:purple")
    axes[3].set_ylabel("app backends", fontsize=8)
    colors = {"rotation": "tab:green", "event": "tab:red"}
    for ax in axes:
        for mark in marks:
            if mark["kind"] == "rotation" and not mark["label"].endswith("pending"):
                continue
            ax.axvline(mark["t"], color=colors.get(mark["kind"], "grey"), lw=0.4, alpha=0.5)
    axes[3].set_xlabel("seconds since the load started (green: rotations, red: kills, outages, restarts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(doc: dict[str, Any]) -> str:
    """The soak's table: one row a minute, then the verdict."""
    lines = [
        f"# Soak: {doc['minutes']} minutes",
        "",
        f"`{doc['command']}` on {doc['machine'].get('cpu', '?')}, started {doc['started_at']}.",
        "",
        f"- requests: {doc['requests']}, failed: {doc['failed']}, lost writes: {doc['lost_writes']}",
        f"- actions: {', '.join(f'{k} x{v}' for k, v in doc['actions'].items())}",
        f"- passwords in the log: {doc['passwords_in_log']}",
        "",
        "| t (s) | RSS MiB per worker | fds | greenlets | engines | pool checked out / size | backends |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    last_minute = -1
    for row in doc["samples"]:
        minute = int(row["t"] // 60)
        if minute == last_minute or not row["workers"]:
            continue
        last_minute = minute
        ws = list(row["workers"].values())
        rss = " / ".join(f"{w['rss_bytes'] / 2**20:.1f}" for w in ws)
        lines.append(
            f"| {row['t']:.0f} | {rss} | {sum(w['fds'] for w in ws)} | {sum(w['greenlets'] for w in ws)} "
            f"| {sum(w['engines'] for w in ws)} | {sum(w['checked_out'] for w in ws)} / "
            f"{sum(w['pool_size'] for w in ws)} | {row['backends']} |"
        )
    lines += ["", "| over the last two thirds | middle third | last third | verdict |", "|---|---:|---:|---|"]
    for key, v in doc["verdict"].items():
        growth = f" (growth {v['growth'] * 100:.2f} %)" if "growth" in v else ""
        ok = {True: "ok", False: "GREW", None: "n/a"}[v.get("ok")]
        lines.append(f"| {key} | {v.get('middle_mean', '')} | {v.get('last_mean', '')} | {ok}{growth} |")
    return "\n".join(lines) + "\n"


SOAK = Scenario(
    "soak",
    "steady load; rotations, idle kills, Secrets Manager outages and restarts on a schedule",
    duration_s=1800,
    smoke_duration_s=60,
    clone=True,
    clients=8,
    entry="bench.soak_wsgi:app",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the schedule (a trial: 0.1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "soak.png")
    args = parser.parse_args(argv)
    for name in SCRUBBED:
        os.environ.pop(name, None)
    duration_s = args.minutes * 60
    samples_dir = Path(tempfile.mkdtemp(prefix="commng-soak-"))
    os.environ.update(BENCH_SOAK_DIR=str(samples_dir), BENCH_SOAK_INTERVAL_S=str(SAMPLE_S))
    command = " ".join(["python -m bench.soak", *(sys.argv[1:] if argv is None else argv)]).strip()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    stack = BenchStack()
    try:
        stack.open()
        run = launch(stack, SOAK, 2, 2000, smoke=False)
        ctx = run.ctx
        load = run.load(duration_s + 120)
        stop = threading.Event()
        try:
            run.begin(time.monotonic())
            sampler = Sampler(ctx, samples_dir)
            sampler.start()
            load.start()
            actions = schedule(args.scale)
            try:
                drive(ctx, actions, duration_s, stop)
                ctx.sleep_until(duration_s)
            finally:
                result = load.stop()
                sampler.stop()
            lost = stack.missing_ids(ctx.db, run.warmup_ids + result.created_ids)
            passwords = measure.passwords_in(run.server.output(), ctx.passwords)
        finally:
            run.server.stop()
    finally:
        stack.close()
        shutil.rmtree(samples_dir, ignore_errors=True)
    doc = {
        "command": command,
        "started_at": started_at,
        "machine": measure.machine(),
        "minutes": args.minutes,
        "requests": len(result.samples),
        "failed": len(result.failures),
        "lost_writes": lost,
        "passwords_in_log": passwords,
        "actions": {a.name: a.count for a in actions},
        "marks": ctx.marks,
        "samples": sampler.rows,
        "verdict": verdict(sampler.rows, duration_s),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(doc, indent=1))
    (args.out / "soak.md").write_text(markdown(doc))
    plot(sampler.rows, ctx.marks, args.plot)
    print(markdown(doc), flush=True)
    grew = [k for k, v in doc["verdict"].items() if v.get("ok") is False]
    return 1 if doc["failed"] or lost or passwords or grew else 0


if __name__ == "__main__":
    sys.exit(main())
