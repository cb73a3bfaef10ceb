"""What a release of commng-rotation is: an sdist and a wheel that pass twine, and a wheel whose tests pass.

The layer's tests, as the sdist carries them, run from a venv holding only the wheel and
its ``test`` and ``gevent`` extras, outside the checkout: they cannot lean on CommNG's
venv, on rotation/src or on anything in the repository.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile

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
            names = sdist.getnames()
            assert {"README.md", "CHANGELOG.md", "LICENSE", "tests/conftest.py"} <= {
                n.split("/", 1)[1] for n in names if "/" in n
            }
            assert not [n for n in names if "__pycache__" in n]
            sdist.extractall(work / "sdist", filter="data")

        installed = make_venv(work / "venv", f"{wheels[0]}[test,gevent]")
        python = str(installed / "bin" / "python")
        where = run([python, "-c", "import commng_rotation; print(commng_rotation.__file__)"])
        assert where.startswith(str(installed)), where
        # The tests the sdist carries, beside its pyproject.toml (their pytest settings); no
        # src/ on the path: they import the installed wheel.
        unpacked = next((work / "sdist").iterdir())
        shutil.rmtree(unpacked / "src")
        out = run([python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], cwd=unpacked)
        assert " passed" in out
