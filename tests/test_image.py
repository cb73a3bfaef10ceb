"""The image's command, without a Docker engine: a venv from requirements.txt alone (as the
builder stage makes it), the files the Dockerfile COPYs, its ENTRYPOINT and CMD."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack import free_port
from devstack.processes import http_status
from tests.helpers import Database, assert_no_secrets, image_venv, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _copy_like_the_dockerfile(app_dir: Path) -> None:
    for line in DOCKERFILE.splitlines():
        if not line.startswith("COPY "):
            continue
        parts = shlex.split(line)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts[1:-1] if not p.startswith("--")]
        for source in sources:
            src = ROOT / source
            if source in {"requirements.txt", "rotation/"}:
                continue  # the builder stage installs these into the venv (image_venv)
            dst = app_dir / ("bin" if source.endswith(".sh") else "") / src.name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


def _exec_form(instruction: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert match, f"the Dockerfile has no exec-form {instruction}"
    return list(eval(match.group(1)))  # noqa: S307 - a JSON array literal from our own file


@pytest.fixture
def app_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="commng-image-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_image_command_serves_from_requirements_txt_alone(database: Database, app_dir: Path) -> None:
    venv = image_venv()  # conftest started the build when the session began
    _copy_like_the_dockerfile(app_dir)
    assert {"wsgi.py", "gunicorn.conf.py", "commng", "config", "migrations"} <= {
        p.name for p in app_dir.iterdir()
    }
    cmd = _exec_form("CMD")
    assert cmd == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    entrypoint = str(app_dir / "bin" / Path(_exec_form("ENTRYPOINT")[0]).name)
    metrics_dir = app_dir / "prometheus-multiproc"
    metrics_dir.mkdir()
    (metrics_dir / "stale.db").write_text("left by a previous run")
    port = free_port()
    env = database.env(
        PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        PORT=str(port),
        WEB_CONCURRENCY="1",
    )
    log = (app_dir / "out.log").open("wb")
    proc = subprocess.Popen(
        ["sh", entrypoint, *cmd], cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: proc.poll() is not None or http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60)
        assert proc.poll() is None, (app_dir / "out.log").read_text()[-3000:]
        assert not (metrics_dir / "stale.db").exists()  # the entrypoint wiped the directory
        # Connection: close: a kept-alive connection would hold the graceful stop for 25 s.
        created = requests.post(
            f"http://127.0.0.1:{port}/api/channels",
            json={"name": "image"},
            headers={"Connection": "close"},
            timeout=10,
        )
        assert created.status_code == 201
        healthcheck = re.search(r'CMD \["python", "-c", "(.*)"\]\s*$', DOCKERFILE, re.MULTILINE)
        assert healthcheck
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c", healthcheck.group(1)], env=env, timeout=10
        )
        assert probe.returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
        log.close()
    assert code == 0
    assert_no_secrets((app_dir / "out.log").read_text(), [database.password])
