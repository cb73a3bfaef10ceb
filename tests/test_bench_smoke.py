"""The benchmark cannot rot: its smoke mode runs in `make test` and must show the claims.

`python -m bench.rotation_bench --smoke` starts its own PostgreSQL, moto and gunicorn, runs
steady, one rotation and a malformed secret under load, and writes the table and JSON.
Those must show traffic, 0 failed requests and 0 lost writes, and the rotation adopted.
The replica scenarios are too slow for the smoke; their arithmetic is checked here on
made-up counters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from bench import measure, routes
from bench.replica import replica_per_second, summarize_reads
from devstack.processes import ROOT
from tests.helpers import Database


def test_bench_route_exists_only_when_the_bench_mounts_it(database: Database, make_app: Any) -> None:
    assert make_app(database.settings()).test_client().get("/bench/sleep").status_code == 404
    app = make_app(database.settings())
    routes.init_app(app)
    enabled = app.test_client().get("/bench/sleep")
    assert enabled.status_code == 200
    assert enabled.get_json() == {"slept_ms": 50}


@pytest.mark.e2e
def test_bench_smoke_produces_a_clean_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench.rotation_bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    doc = json.loads((out / "latest.json").read_text())
    scenarios = {s["name"]: s for s in doc["scenarios"]}
    assert set(scenarios) == {"steady", "rotate", "bad-secret"}
    for s in scenarios.values():
        assert s["requests"] > 100, f"{s['name']}: the load generator did not run"
        assert s["failures"] == 0, (s["name"], s["failure_reasons"])
        assert s["writes"]["created"] > 0, s["name"]
        assert s["writes"]["lost"] == 0, s["name"]
        assert s["backends"]["final"] <= s["backends"]["limit"], s["name"]
    rotate = scenarios["rotate"]
    assert len(rotate["rotations"]) == 1
    assert sum(len(v) for v in rotate["detection_ms"].values()) >= rotate["workers"], "rotation not adopted"
    assert rotate["around_rotations_ms"]["p99"] is not None
    assert any(k.startswith("refresh_failed") for k in scenarios["bad-secret"]["app_events"])

    table = (out / "latest.md").read_text()
    assert "| scenario | requests |" in table
    assert "| rotate |" in table
    assert "| target | measured | met |" in table
    assert (out / "latest.png").stat().st_size > 10_000
    assert not [t for t in doc["targets"] if "failed requests" in t["target"] and not t["ok"]]


def test_replica_shares_are_taken_per_phase_from_the_read_counters() -> None:
    # (seconds from t0, replica reads, primary reads), cumulative as the counters are.
    series = [(0.0, 0, 0), (1.0, 100, 0), (2.0, 101, 50), (3.0, 101, 100), (4.0, 150, 110), (5.0, 250, 110)]
    outage = {"replica_down_at_s": 1.0, "replica_stopped_at_s": 1.5, "replica_up_at_s": 3.0}
    # Worker 7 logged a resume while the standby was still shutting down: not a return.
    resumed = [(1.2, 7), (3.9, 7), (4.1, 8), (4.5, 8)]

    reads = summarize_reads(series, [], outage, resumed)

    phases = reads["phases"]
    assert phases["run"] == {"replica": 250, "primary": 110, "share": 0.694}
    assert phases["before"] == {"replica": 100, "primary": 0, "share": 1.0}
    assert phases["during"] == {"replica": 1, "primary": 100, "share": 0.01}
    assert phases["after"] == {"replica": 149, "primary": 10, "share": 0.937}
    assert reads["back_on_replica_s"] == 1.0
    assert reads["workers_back_s"] == [0.9, 1.1]
    assert replica_per_second(series) == [100, 1, 0, 49, 100]  # the plot's line

    rotations = [{"start": 1.0, "alter": 1.1, "end": 1.5}]
    around = summarize_reads(series, rotations, {}, [])["phases"]["around_rotations"]
    assert around == {"replica": 150, "primary": 110, "share": 0.577}  # from 1.0 to 1.5 + 5 s (the end)


def test_the_password_check_sees_raw_and_url_encoded_passwords() -> None:
    password = "Zx9_token#?%&=+:;"
    log = f'{{"event": "x", "url": "postgresql://app:{urllib.parse.quote(password)}@127.0.0.1/db"}}'
    assert measure.passwords_in(log, [password, "not-there"]) == 1
    assert measure.passwords_in(log.replace(urllib.parse.quote(password), "***"), [password]) == 0
