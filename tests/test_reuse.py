"""Another Flask-SQLAlchemy application adopts the rotation layer, and nothing else of CommNG.

The adopter below is defined here, with a model of its own. It survives a rotation made
the way RDS makes one (AWSPENDING, ALTER ROLE, AWSCURRENT moves) against the real test
PostgreSQL and moto, and building it loads no CommNG module outside ``commng_rotation``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import commng_rotation as rotation
from commng_rotation import PinnedSession, RotationSettings
from devstack import new_password, rotate_secret
from devstack.processes import ROOT
from tests.helpers import Database, assert_no_secrets, wait_for


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base, session_options={"class_": PinnedSession})


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "adopter_notes"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    text: Mapped[str] = mapped_column(sa.Text)


def create_adopter_app(settings: RotationSettings, secrets_client: Any = None) -> Flask:
    """The whole integration an adopter writes: the pinned session, init_app, nothing else."""
    app = Flask("adopter")
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    rotation.init_app(app, db, settings, secrets_client=secrets_client)

    @app.post("/notes")
    def add_note() -> Any:
        note = Note(text=request.get_json()["text"])
        db.session.add(note)
        db.session.commit()
        return {"id": note.id}, 201

    @app.get("/notes/<int:note_id>")
    def get_note(note_id: int) -> Any:
        note = db.get_or_404(Note, note_id)
        return {"id": note.id, "text": note.text}

    return app


def _settings(database: Database, secret_id: str | None) -> RotationSettings:
    return RotationSettings(
        secret_id=secret_id,
        host="127.0.0.1",
        port=database.cluster.port,
        dbname=database.name,
        sslmode="disable",
        pool_size=2,
        grace_period_s=1.0,
        refresh_interval_s=1.0,
        application_name="adopter",
    )


def test_an_adopter_app_survives_a_rotation(database: Database, secretsmanager: Any, caplog: Any) -> None:
    created = secretsmanager.create_secret(
        Name=f"adopter/{database.name}", SecretString=database.secret_string()
    )
    arn = created["ARN"]
    app = create_adopter_app(_settings(database, arn), secretsmanager)
    runtime = rotation.get_runtime(app)
    try:
        with app.app_context():
            db.create_all()
            rotation.history.metadata.create_all(db.engine)
        client = app.test_client()
        first = client.post("/notes", json={"text": "before"}).get_json()["id"]
        new = new_password()
        rotate_secret(secretsmanager, arn, database.cluster, database.role, new)
        # A login with the old password is refused from now on.
        runtime.rotator().active.engine.dispose()  # type: ignore[union-attr]

        # The first new connection fails its login and the layer refreshes on its own.
        second = client.post("/notes", json={"text": "after"})
        assert second.status_code == 201
        assert client.get(f"/notes/{first}").get_json() == {"id": first, "text": "before"}
        event = runtime.events.recent(1)[0]
        assert (event.trigger, event.outcome) == ("auth_failure", "rotated")
        assert runtime.watcher is not None
        assert runtime.watcher.check_once()[0].change == "unchanged"
        wait_for(lambda: not runtime.rotator().draining)
        assert runtime.history.flush()
        with app.app_context():
            rows, _ = rotation.list_events(db.session, 10)
        assert ("auth_failure", "rotated") in {(r.trigger, r.outcome) for r in rows}
        assert_no_secrets(caplog.text, [database.password, new])
    finally:
        runtime.stop()


ADOPTER_IMPORTS = """
import json, os, sys
import commng_rotation
layer = sorted(name for name in sys.modules if name.split(".")[0] in {"commng", "commng_rotation", "config"})
from dataclasses import replace
from tests.test_reuse import create_adopter_app, db, RotationSettings
settings = RotationSettings(
    host="127.0.0.1", port=int(sys.argv[1]), dbname=sys.argv[2], username=sys.argv[3],
    password=os.environ["ADOPTER_PASSWORD"], sslmode="disable", application_name="adopter",
)
app = create_adopter_app(settings)
with app.app_context():
    db.create_all()
assert app.test_client().post("/notes", json={"text": "x"}).status_code == 201
commng_rotation.get_runtime(app).stop()
print(json.dumps({"layer": layer, "all": sorted(name for name in sys.modules if name.startswith("commng"))}))
print(json.dumps({"file": commng_rotation.__file__}))
"""


def test_the_adopter_loads_nothing_of_commng_outside_the_rotation_layer(database: Database) -> None:
    run = subprocess.run(
        [sys.executable, "-c", ADOPTER_IMPORTS, str(database.cluster.port), database.name, database.role],
        env={**os.environ, "ADOPTER_PASSWORD": database.password},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    *_, modules, where = run.stdout.strip().splitlines()
    loaded = json.loads(modules)
    # The layer alone: no CommNG module outside it, and not CommNG's configuration either.
    assert "commng_rotation" in loaded["layer"]
    assert all(n.startswith("commng_rotation") for n in loaded["layer"]), loaded["layer"]
    # The running adopter: still nothing of the API, the admin, the models or the app.
    assert all(n.startswith("commng_rotation") for n in loaded["all"]), loaded["all"]
    # ...and it is the installed distribution, as an adopter gets it, not this checkout's source.
    installed = Path(json.loads(where)["file"]).resolve()
    assert "site-packages" in installed.parts, installed
    assert version("commng-rotation") == rotation.__version__
