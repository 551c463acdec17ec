#!/usr/bin/env bash
# Set up a fresh machine for dbrouter's demo and tests.
#  - installs PostgreSQL, MariaDB and Redis server binaries, and Patroni with etcd, with apt
#    when they are absent (the local clusters are started from these binaries, never from
#    system services: no service a package would start is started, see below);
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
# Patroni-managed clusters (tests/test_patroni.py, drill --local patroni): Patroni 3 with its
# etcd client library (the v3 API is Patroni's own code on top of it) and an etcd 3.4 server.
command -v patroni >/dev/null 2>&1 || missing+=(patroni)
/usr/bin/python3 -c 'import etcd' >/dev/null 2>&1 || missing+=(python3-etcd)  # Debian's Python runs Patroni
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # etcd-server's (and the other servers') postinst would start a system service: an etcd on
  # 2379 that nothing of ours uses, and that a test could come to depend on or collide with.
  # A policy-rc.d that answers 101 ("action forbidden") keeps invoke-rc.d and
  # deb-systemd-invoke from starting anything; one that was already there is left as it was.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by dbrouter scripts/setup.sh for the duration of apt-get install\nexit 101\n' \
      | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 0755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Nor at the next boot: under systemd the packages enable their units (only those just
  # installed here are disabled).
  if [ -d /run/systemd/system ]; then
    for unit in etcd patroni; do
      case " ${missing[*]} " in
        *" $unit "*|*" $unit-server "*) $SUDO systemctl disable --now "$unit.service" >/dev/null 2>&1 || true ;;
      esac
    done
  fi
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

# Django's latest release needs a newer Python than Django's LTS: the Django tests run the
# example project under both, the latest one from .venv-django-latest (dbrouter, its drivers
# and the newest Django), with the first Python >= 3.12 found here.
latest_python=""
for candidate in "${DJANGO_LATEST_PYTHON:-}" python3.13 python3.12 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    latest_python=$(command -v "$candidate"); break
  fi
done
if [ -z "$latest_python" ]; then
  echo "setup: no Python >= 3.12 found (set DJANGO_LATEST_PYTHON): the Django-latest tests will fail" >&2
else
  if [ ! -x .venv-django-latest/bin/python ]; then
    "$latest_python" -m venv .venv-django-latest
  fi
  .venv-django-latest/bin/python -m pip install -q --disable-pip-version-check -e '.[postgres,mysql]' 'django>=6'
  site=$(.venv-django-latest/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' 'import sys; exec("try:\n import _mysql_connector\nexcept Exception:\n pass")' > "$site/dbrouter-mysql-first.pth"
fi
echo "setup: ready (.venv/bin/dbrouter, .venv/bin/python -m pytest)"
