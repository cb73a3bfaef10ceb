"""A retired engine is freed: many rotations in a loop leave nothing behind.

A dialect is kept, after its engine is gone, by caches keyed on it (the ORM's compiled
statements of each mapper, up to 100 entries each): nothing the dialect holds may reach
the engine, its pools or their connection records.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

from flask import Flask

from commng_rotation import get_runtime
from devstack import new_password
from tests.helpers import Database, wait_for

ROTATIONS = 200
# Generous against allocator noise; leaking engines grew about 150 kB per rotation.
MAX_RSS_GROWTH_KB = 2048
# The first rotations fill caches that stay (the ORM's per-mapper LRU); measured after them.
WARM_UP = 20


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_retired_engines_are_freed_after_many_rotations(
    database: Database, secretsmanager: Any, secret: str, make_app: Any
) -> None:
    settings = database.settings(
        db_secret_id=secret, postgres_user=None, postgres_password=None, db_pool_grace_period_ms=0
    )
    app: Flask = make_app(settings, secrets_client=secretsmanager)
    runtime = get_runtime(app)
    assert runtime.watcher is not None
    r = runtime.rotator()
    client = app.test_client()
    retired: list[weakref.ref[Any]] = []
    dialects: list[weakref.ref[Any]] = []
    rss_after_warm_up = 0

    for i in range(ROTATIONS):
        assert r.active is not None
        retired.append(weakref.ref(r.active.engine))
        dialects.append(weakref.ref(r.active.engine.dialect))
        new = new_password()
        database.cluster.set_password(database.role, new)
        secretsmanager.put_secret_value(SecretId=secret, SecretString=database.secret_string(new))
        assert runtime.watcher.check_once()[0].outcome == "rotated"
        # A read and a write through the ORM, on the new engine.
        assert client.get("/api/channels").status_code == 200
        assert client.post("/api/channels", json={"name": f"rotation-{i}"}).status_code == 201
        wait_for(lambda: not r.draining)
        if i + 1 == WARM_UP:
            gc.collect()
            rss_after_warm_up = _rss_kb()

    gc.collect()
    alive = sum(ref() is not None for ref in retired)
    assert alive == 0, f"{alive} of {ROTATIONS} retired engines are still reachable"
    # Their dialects too: the ORM's compiled statements for them were dropped.
    kept = sum(ref() is not None for ref in dialects)
    assert kept == 0, f"{kept} of {ROTATIONS} retired dialects are still reachable"
    grown = _rss_kb() - rss_after_warm_up
    assert grown < MAX_RSS_GROWTH_KB, f"RSS grew {grown} kB over {ROTATIONS - WARM_UP} rotations"
