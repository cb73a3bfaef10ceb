"""`make bench`: the rotation benchmark. `python -m bench.rotation_bench --help`.

For each scenario: a fresh database and role, a fresh gunicorn (the project's own
gunicorn.conf.py, JSON logs), N client threads against the messaging API, the
scenario's action, then the measurements (see bench/report.py for what is reported;
bench/tables.py and bench/plots.py render it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import fleet, measure, plots, report, runs, tables
from bench.runs import GRACE_MS, SCRUBBED, SMOKE_GRACE_MS, run_pair, run_scenario
from bench.scenarios import SCENARIOS, SMOKE
from bench.stack import BenchStack
from devstack.processes import ROOT

DEFAULT_WORKERS = 2
DEFAULT_INTERVAL_MS = 2000
# Scenarios run interleaved when both are asked for (and not --smoke).
PAIRS = (("steady", "static"), ("service", "baseline"), ("iam", "iam-password"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rotation_bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted([*SCENARIOS, fleet.NAME]),
        help="repeatable; default all",
    )
    parser.add_argument("--smoke", action="store_true", help=f"short run of {', '.join(SMOKE)} (< 60 s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--interval-ms", type=int, default=DEFAULT_INTERVAL_MS, help="DB_SECRET_REFRESH_INTERVAL_MS"
    )
    parser.add_argument(
        "--out", type=Path, help="results directory (default bench/results; smoke: a temp dir)"
    )
    parser.add_argument(
        "--plot", type=Path, help="PNG path (default docs/bench-rotation.png; smoke: OUT/latest.png)"
    )
    parser.add_argument(
        "--pin-load",
        type=int,
        metavar="CPU",
        help="load generator on this CPU, servers on the others (scenarios run alone; bench/pinning.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (gunicorn logs)")
    parser.add_argument(
        "--no-keys",
        action="store_true",
        help="fault scenarios' clients post without Idempotency-Key (still retrying a 503 once)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    runs.CLIENT_KEYS = not args.no_keys
    # The fleet scenario (4 gunicorns) has a table of its own and is never part of the smoke.
    names = args.scenario or list(SMOKE if args.smoke else [*SCENARIOS, fleet.NAME])
    out = args.out or (
        Path(tempfile.gettempdir()) / "commng-bench-smoke" if args.smoke else ROOT / "bench" / "results"
    )
    plot = args.plot or (out / "latest.png" if args.smoke else ROOT / "docs" / "bench-rotation.png")
    for name in SCRUBBED:
        os.environ.pop(name, None)
    command = " ".join(["python -m bench.rotation_bench", *(sys.argv[1:] if argv is None else argv)])
    started = time.monotonic()
    meta = {
        "command": command.strip(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": measure.machine(),
        "workers": args.workers,
        "refresh_interval_ms": args.interval_ms,
        "grace_ms": SMOKE_GRACE_MS if args.smoke else GRACE_MS,
        "smoke": args.smoke,
    }
    results: list[dict[str, Any]] = []
    stack = BenchStack(keep=args.keep)
    try:
        stack.open()
        done: dict[str, dict[str, Any]] = {}
        for name in names:
            if name == fleet.NAME:
                fleet.run(stack, out)
                continue
            if name in done:
                continue
            scenario = SCENARIOS[name]
            pair = next((p for p in PAIRS if name in p and set(p) <= set(names)), None)
            if pair is not None and not args.smoke:
                a, b = pair
                results_ab = run_pair(stack, SCENARIOS[a], SCENARIOS[b], args.workers, args.interval_ms)
                done.update({a: results_ab[0], b: results_ab[1]})
            else:
                workers = scenario.workers or args.workers
                done[name] = run_scenario(
                    stack, scenario, workers, args.interval_ms, args.smoke, args.pin_load
                )
        results = [done[name] for name in names if name != fleet.NAME]
    finally:
        stack.close()
    meta["wall_s"] = round(time.monotonic() - started, 1)
    if not results:  # only the fleet scenario ran: its table is written
        return 0
    doc = report.build(meta, results)
    write(doc, out, plot)
    print(tables.markdown(doc), flush=True)
    print(f"written: {out / 'latest.md'}, {out / 'latest.json'}, {plot}", flush=True)
    missed = [t for t in doc["targets"] if t["ok"] is False]
    return 1 if args.strict and missed else 0


def write(doc: dict[str, Any], out: Path, plot_path: Path) -> None:
    """latest.md (bench/tables.py), latest.json (the document itself) and the PNG (bench/plots.py)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(tables.markdown(doc))
    (out / "latest.json").write_text(json.dumps(doc, indent=1))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plots.plot(doc, plot_path)


if __name__ == "__main__":
    sys.exit(main())
