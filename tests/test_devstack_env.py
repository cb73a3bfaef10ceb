"""`python -m devstack env` against a stack that only looks running: a state file and the held run lock.

What `make example` relies on: ``--secret`` puts another secret in DB_SECRET_ID (the
master, its DDL login), and both region variables are exported, since a plain boto3 client
reads AWS_DEFAULT_REGION and not AWS_REGION. No PostgreSQL, moto or gunicorn is started.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {
    "master": "arn:aws:secretsmanager:us-east-1:123456789012:secret:commng/local/master-AbCdEf",
    "app": "arn:aws:secretsmanager:us-east-1:123456789012:secret:commng/local/app-GhIjKl",
}


@pytest.fixture
def local_dir(tmp_path: Path) -> Iterator[Path]:
    """A .local/ whose stack.json names two secrets and whose run.lock this test holds."""
    state = {
        "shape": "app",
        "pg_port": 5999,
        "endpoint": "http://127.0.0.1:5998",
        "secrets": SECRETS,
        "admin_token": "t" * 32,
    }
    (tmp_path / "stack.json").write_text(json.dumps(state))
    lock = tmp_path / "run.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "port": 8000}).encode())
    try:
        yield tmp_path
    finally:
        os.close(fd)


def _exports(local_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DB_", "POSTGRES_"))}
    return subprocess.run(
        [sys.executable, "-m", "devstack", "env", *args],
        cwd=ROOT,
        env={**env, "COMMNG_LOCAL_DIR": str(local_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_env_exports_both_region_variables_and_the_services_secret(local_dir: Path) -> None:
    done = _exports(local_dir)
    assert done.returncode == 0, done.stderr
    exports = dict(re.findall(r"^export (\w+)=(.*)$", done.stdout, re.MULTILINE))
    assert exports["AWS_REGION"] == exports["AWS_DEFAULT_REGION"] == "us-east-1"
    assert exports["DB_SECRET_ID"] == SECRETS["app"]


def test_env_secret_names_another_secret_and_refuses_one_the_stack_lacks(local_dir: Path) -> None:
    done = _exports(local_dir, "--secret", "master")
    assert done.returncode == 0, done.stderr
    exports = dict(re.findall(r"^export (\w+)=(.*)$", done.stdout, re.MULTILINE))
    assert exports["DB_SECRET_ID"] == SECRETS["master"]
    missing = _exports(local_dir, "--secret", "replica")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "the local stack has no replica secret (it has master, app)"
