"""A minimal Flask-SQLAlchemy app that follows its database password through rotations.

    pip install ./rotation gunicorn gevent
    DB_SECRET_ID=arn:aws:secretsmanager:... POSTGRES_HOST=... \
        gunicorn -c rotation/example/gunicorn.conf.py --chdir rotation/example app:app

Everything the rotation layer needs is here: the pinned session, ``init_app`` with a
``RotationSettings``, and the two gunicorn hooks in ``gunicorn.conf.py`` beside this file.
"""

from gevent import monkey

monkey.patch_all()  # before anything imports socket, ssl or boto3

import os  # noqa: E402

from flask import Flask  # noqa: E402
from flask_sqlalchemy import SQLAlchemy  # noqa: E402

import commng_rotation as rotation  # noqa: E402
from commng_rotation import PinnedSession, RotationSettings  # noqa: E402

db = SQLAlchemy(session_options={"class_": PinnedSession})


class Note(db.Model):  # type: ignore[name-defined,misc]
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.Text, nullable=False)


def create_app() -> Flask:
    app = Flask(__name__)
    # A URL without a password: the layer replaces the engine and logs in at connect time.
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://"
    db.init_app(app)
    rotation.init_app(
        app,
        db,
        RotationSettings(
            secret_id=os.environ["DB_SECRET_ID"],
            aws_region=os.environ.get("AWS_REGION"),
            host=os.environ.get("POSTGRES_HOST", "localhost"),
            dbname=os.environ.get("POSTGRES_DB", "postgres"),
            sslmode=os.environ.get("POSTGRES_SSL", "require"),
            application_name="notes",
        ),
    )

    @app.get("/notes/<int:note_id>")
    def get_note(note_id: int) -> dict[str, object]:
        note = db.get_or_404(Note, note_id)
        return {"id": note.id, "text": note.text}

    return app


app = create_app()
