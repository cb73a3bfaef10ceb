"""What a release of commng-rotation is: an sdist and a wheel that pass twine, and a wheel whose tests pass.

The layer's tests run from a venv holding only the wheel and its ``test`` extra, against
a copy of rotation/tests outside the checkout: they cannot lean on CommNG's venv, on
rotation/src or on anything in the repository.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.venvs import copy_layer, make_venv, run, temporary_dir, uv

pytestmark = pytest.mark.e2e

# The tools that build and check the release, pinned like every other dependency.
BUILD_TOOLS = ("build==1.6.1", "twine==7.0.0")


def test_the_release_builds_passes_twine_check_and_its_wheel_passes_the_layers_tests() -> None:
    with temporary_dir("commng-release-") as work:
        source = copy_layer(work / "rotation")
        tools = make_venv(work / "tools", *BUILD_TOOLS)
        dist = work / "dist"
        # build's isolated backend environment, made by uv too (--installer uv finds it on PATH).
        env = {**os.environ, "PATH": f"{uv().parent}:{tools / 'bin'}:{os.environ['PATH']}"}
        run(
            [
                str(tools / "bin" / "python"),
                "-m",
                "build",
                "--installer",
                "uv",
                "--outdir",
                str(dist),
                str(source),
            ],
            env=env,
        )
        sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
        assert len(sdists) == 1
        assert len(wheels) == 1
        run([str(tools / "bin" / "twine"), "check", "--strict", *map(str, sdists + wheels)])
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = wheel.namelist()
        assert "commng_rotation/py.typed" in names
        assert any(n.endswith("licenses/LICENSE") for n in names)
        with tarfile.open(sdists[0]) as sdist:
            assert any(n.endswith("/README.md") for n in sdist.getnames())

        installed = make_venv(work / "venv", f"{wheels[0]}[test,gevent]")
        python = str(installed / "bin" / "python")
        where = run([python, "-c", "import commng_rotation; print(commng_rotation.__file__)"])
        assert where.startswith(str(installed)), where
        tests = Path(shutil.copytree(source / "tests", work / "layer-tests"))
        shutil.copy2(source / "pyproject.toml", work / "pyproject.toml")  # its pytest settings
        out = run([python, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider"], cwd=work)
        assert " passed" in out
