"""`python -m bench.calls`: Python function calls per request, the service against the yardstick.

CPU time per request moves with everything else on a 2-core machine; the number of
Python function calls a request makes does not, and on CPython it is most of a
worker's CPU. Each variant (``service``: the product's ``wsgi:app``; ``baseline``:
``bench/baseline_wsgi.py``) runs under gunicorn as in ``bench/cost.py`` (2 gevent
workers, pool 5, 16 clients posting a message then reading a channel's 20 newest),
one after the other, with cProfile on in its workers for the measured seconds only
(``bench/profiled_wsgi.py``). Requests are counted as calls of ``Flask.wsgi_app``.

Prints and writes ``bench/results/calls.md``: calls per request for each, and the
modules whose code makes the difference (calls made from each module's functions,
built-ins included). ``--without X`` (repeatable) adds the service without feature X
(``bench/feature_wsgi.py``), and a column of what X costs in calls per request.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.features import FEATURES
from bench.runs import SCRUBBED, launch
from bench.scenarios import SCENARIOS, Scenario
from bench.stack import BenchStack
from devstack.processes import ROOT

__all__ = ["main"]

VARIANTS = ("service", "baseline")


def _short(path: str) -> str:
    return "/".join(path.split("/")[-2:]) if path != "~" else "built-in"


def per_module(stats: pstats.Stats) -> tuple[int, collections.Counter[str]]:
    """Requests served, and calls made from each module's functions (summed over callees)."""
    requests = 0
    calls: collections.Counter[str] = collections.Counter()
    for (path, _, name), (_, ncalls, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "wsgi_app" and path.endswith("flask/app.py"):
            requests += ncalls
        for (caller_path, _, _), counts in callers.items():
            calls[_short(caller_path)] += counts[1]
    return requests, calls


def _scenario(name: str) -> Scenario:
    """``service``, ``baseline``, or ``-X``: the service without feature X."""
    if not name.startswith("-"):
        return SCENARIOS[name]
    return dataclasses.replace(
        SCENARIOS["service"], name=name, entry="bench.feature_wsgi:app", env=(("BENCH_WITHOUT", name[1:]),)
    )


def measure(stack: BenchStack, name: str, seconds: float, out: Path) -> tuple[int, collections.Counter[str]]:
    scenario = _scenario(name)
    target = scenario.entry or "wsgi:app"
    profiled = dataclasses.replace(
        scenario,
        entry="bench.profiled_wsgi:app",
        env=(*scenario.env, ("BENCH_PROFILE_TARGET", target), ("BENCH_PROFILE_OUT", str(out))),
    )
    run = launch(stack, profiled, 2, 60_000, False)
    try:
        load = run.load(seconds + 60)
        load.start()
        time.sleep(1.0)  # the clients are connected and going
        for pid in run.pids:
            os.kill(pid, signal.SIGUSR2)
        time.sleep(seconds)
        for pid in run.pids:
            os.kill(pid, signal.SIGUSR2)
        files = [out / f"{pid}.prof" for pid in run.pids]
        deadline = time.monotonic() + 30
        while not all(f.exists() for f in files):  # each worker renames its finished dump into place
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: the workers wrote no profile within 30 s")
            time.sleep(0.1)  # bounded poll for the workers' dump
        load.stop()
        return per_module(pstats.Stats(*map(str, files)))
    finally:
        run.server.stop()


def markdown(results: dict[str, tuple[int, collections.Counter[str]]], top: int) -> str:
    totals = {name: sum(c.values()) / n for name, (n, c) in results.items()}
    (n_s, c_s), (n_b, c_b) = results["service"], results["baseline"]
    lines = [
        f"**Python function calls per request: service {totals['service']:.0f}, baseline "
        f"{totals['baseline']:.0f}** ({totals['service'] - totals['baseline']:+.0f}; "
        f"{n_s} and {n_b} requests profiled).",
        "",
    ]
    features = [name for name in results if name.startswith("-")]
    if features:
        lines += ["| feature | calls per request it costs |", "|---|---:|"]
        for name in features:
            lines.append(f"| {name[1:]} | {totals['service'] - totals[name]:.0f} |")
        lines.append("")
    lines += ["| calls made from | service | baseline | difference |", "|---|---:|---:|---:|"]
    rows = sorted(set(c_s) | set(c_b), key=lambda m: -abs(c_s[m] / n_s - c_b[m] / n_b))
    for module in rows[:top]:
        s, b = c_s[module] / n_s, c_b[module] / n_b
        lines.append(f"| {module} | {s:.1f} | {b:.1f} | {s - b:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="profiled seconds of load per variant")
    parser.add_argument("--top", type=int, default=25, help="modules listed")
    parser.add_argument("--without", action="append", choices=FEATURES, default=[], help="repeatable")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    for name in SCRUBBED:
        os.environ.pop(name, None)
    stack = BenchStack()
    results = {}
    with tempfile.TemporaryDirectory(prefix="commng-calls-") as tmp:
        try:
            stack.open()
            for name in (*VARIANTS, *(f"-{feature}" for feature in args.without)):
                out = Path(tmp) / name
                out.mkdir()
                results[name] = measure(stack, name, args.seconds, out)
        finally:
            stack.close()
    text = markdown(results, args.top)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.calls", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "calls.md").write_text(f"Command: `{command}`\n\n{text}")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
