"""Runs ``terraform test`` (tests/*.tftest.hcl): whole-configuration plans against a mocked
AWS provider, offline. Needs the terraform binary and an initialised infra/ (``terraform init
-backend=false``, which scripts/lint-infra.sh runs before pytest); skipped otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[1]


def test_terraform_test_plans_with_a_mocked_provider():
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not on PATH")
    if not (INFRA / ".terraform" / "providers").is_dir():
        pytest.skip("infra/ is not initialised: run terraform init -backend=false first")
    result = subprocess.run(
        ["terraform", f"-chdir={INFRA}", "test", "-no-color"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
