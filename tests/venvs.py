"""Throwaway venvs built with the Makefile's pinned uv, for tests that install the layer as a stranger would.

A venv with the repository's requirements would prove nothing about the distribution's own
metadata: the release and example tests install only what a user of ``rotation/`` installs.
uv makes such a venv in a few seconds from its cache (pip takes 25-40 s here).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UV_VENV = REPO / ".local" / "venvs" / "uv"


def uv() -> Path:
    """The uv binary the Makefile pins (``make`` builds it under .local/venvs/uv); built here if missing."""
    binary = UV_VENV / "bin" / "uv"
    if not binary.exists():
        pin = re.search(r"uv==[0-9.]+", (REPO / "Makefile").read_text())
        assert pin, "the Makefile no longer pins uv"
        run([sys.executable, "-m", "venv", str(UV_VENV)])
        run([str(UV_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", pin.group()])
    return binary


def run(
    command: Sequence[str],
    timeout_s: float = 300.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``command``; its stdout, or AssertionError with the tail of what it printed."""
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout_s, check=False, cwd=cwd, env=env
    )
    if done.returncode != 0:
        tail = (done.stdout[-2000:] + done.stderr[-3000:]).strip()
        raise AssertionError(f"{' '.join(command[:4])} ... exited with {done.returncode}:\n{tail}")
    return done.stdout


def make_venv(path: Path, *requirements: str, cwd: Path | None = None) -> Path:
    """A new venv at ``path`` (this interpreter's Python) with ``requirements`` installed by uv.

    ``cwd``: where relative paths in ``requirements`` (and in a ``-r`` file) start.
    """
    binary = str(uv())
    run([binary, "venv", "--quiet", "--no-config", "--python", sys.executable, str(path)])
    if requirements:
        python = str(path / "bin" / "python")
        run([binary, "pip", "install", "--quiet", "--no-config", "--python", python, *requirements], cwd=cwd)
    return path


@contextmanager
def temporary_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp, removed with everything in it after the block."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_layer(target: Path) -> Path:
    """rotation/ without build leftovers: a build never writes into the checkout."""
    ignored = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
    return Path(shutil.copytree(REPO / "rotation", target, ignore=ignored))
