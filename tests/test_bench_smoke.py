"""The benchmark cannot rot: its smoke mode runs in `make test` and must show the claims.

`python -m bench.rotation_bench --smoke` starts its own PostgreSQL, moto and gunicorn, runs
steady, one rotation and a malformed secret under load, and writes the table and JSON.
Those must show traffic, 0 failed requests and 0 lost writes, and the rotation adopted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import routes
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
