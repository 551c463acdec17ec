#!/usr/bin/env bash
# Set up a fresh machine for dbrouter's demo and tests.
#  - installs PostgreSQL, MariaDB and Redis server binaries with apt when they are absent
#    (the local clusters are started from these binaries, never from system services);
#  - creates .venv and installs dbrouter with its test dependencies into it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have_postgres() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && return 0
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]
}
have_mariadb() { command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; }

missing=()
have_postgres || missing+=(postgresql postgresql-contrib)
have_mariadb || missing+=(mariadb-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # the fleet (shared breaker) tests
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# mysql-connector's C extension bundles its own OpenSSL and fails to load once the
# system libcrypto is in the process (pytest imports hashlib before any test code).
# This .pth loads it first in every interpreter of the venv; without it the
# connector silently falls back to pure Python.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' 'import sys; exec("try:\n import _mysql_connector\nexcept Exception:\n pass")' > "$site/dbrouter-mysql-first.pth"
echo "setup: ready (.venv/bin/dbrouter, .venv/bin/python -m pytest)"
