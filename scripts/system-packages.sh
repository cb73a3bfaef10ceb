#!/usr/bin/env bash
# Install the Debian packages the local stack and the tests need, if they are missing,
# with a single apt-get run. Usage: scripts/system-packages.sh postgresql [chromium]
#   postgresql  the server binaries (initdb, pg_ctl): required; without root it stops here
#   chromium    the admin page's browser test: optional; without root that test skips
set -euo pipefail

have() {
  case "$1" in
    postgresql) command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 ;;
    chromium) command -v chromium >/dev/null 2>&1 ;;
    *) echo "unknown package $1" >&2; exit 2 ;;
  esac
}

missing=()
for package in "$@"; do
  have "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get install -y)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi

for package in "${missing[@]}"; do
  if [ "$package" = postgresql ]; then
    echo "PostgreSQL server binaries not found: run 'sudo apt-get install -y postgresql'" >&2
    exit 1
  fi
  echo "$package not found: the tests that need it will skip ('sudo apt-get install -y $package')"
done
