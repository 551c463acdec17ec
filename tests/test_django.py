"""The Django integration on real clusters, through the example project (examples/django_app).

Django's settings are configured once per process, so each test runs the project's own
``manage.py`` in a child process, as a user would: ``manage.py test shop`` creates the test
database on the primary (the replica alias is its TEST MIRROR), migrates it, and runs the
project's tests (examples/django_app/shop/tests.py): Django's transactions, savepoints,
on_commit, select_for_update, bulk_create, server-side cursors, DEBUG query logging,
migrations and dbshell on dbrouter's connections, then the stale-read test (create-then-read
requests through Django's test client while every replica pauses its replay 1 s at a
time). The kill-primary-promote test gets a cluster of its own.

Each test runs under Django's LTS (this venv) and Django's latest release
(``.venv-django-latest``, made by scripts/setup.sh with a newer Python, as that release needs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from dbrouter.cluster import LocalCluster, make_cluster

from .test_examples import cluster_env

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "django_app"
LATEST = ROOT / ".venv-django-latest" / "bin" / "python"
# The stale-read test's create-then-read requests per engine. The issue asks for 10,000:
# about 40 s per engine on an idle 2-core machine (3-4 ms a request, the servers included),
# several minutes when the machine is busy; CI runs 2,000 to keep the suite's budget, and
# DBROUTER_DJANGO_REQUESTS=10000 runs the full count.
REQUESTS = int(os.environ.get("DBROUTER_DJANGO_REQUESTS", "2000"))
OPTIONS = '{"health_interval": 0.2, "causal_wait": 0.02, "statement_timeout": 5, "connect_timeout": 2, "acquire_timeout": 2}'


def result(output: str, name: str) -> dict[str, str]:
    """The ``RESULT <name> key=value ...`` line a project test printed."""
    found = re.search(rf"^RESULT {name} (.*)$", output, re.MULTILINE)
    assert found, f"no RESULT {name} line in:\n{output[-5000:]}"
    return dict(re.findall(r"(\w+)=(\{[^}]*\}|\S+)", found[1]))


@pytest.fixture(params=["lts", "latest"])
def django_python(request: pytest.FixtureRequest) -> str:
    """The interpreter that runs the project: this one (Django LTS) or the Django-latest venv."""
    if request.param == "lts":
        return sys.executable
    assert LATEST.exists(), f"{LATEST} is missing: scripts/setup.sh makes it (it needs a Python >= 3.12)"
    version = subprocess.run([str(LATEST), "-c", "import django; print(django.VERSION[0])"],
                             capture_output=True, text=True, check=True).stdout
    assert int(version) >= 6, f"{LATEST} has Django {version.strip()}, not the latest release"
    return str(LATEST)


# dbrouter's Django PostgreSQL backend runs on psycopg2 (README: Limits), and Django takes psycopg
# 3 whenever it can import it, which this venv can (the dev extra has it, for dbrouter's psycopg 3
# adapter): the project runs with psycopg 3 hidden, as in an application that installs psycopg2
# only. (manage.py's own children are forked, or are psql and mysql.)
WITHOUT_PSYCOPG3 = ("import runpy, sys; sys.modules['psycopg'] = None; sys.argv = sys.argv[1:]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def manage(python: str, cluster: LocalCluster, state: Path, *args: str, timeout: float, **extra: str) -> str:
    env = {**cluster_env(cluster), "DBROUTER_TEST_CLUSTER_STATE": str(state), "DBROUTER_DJANGO_OPTIONS": OPTIONS,
           "PYTHONPATH": os.pathsep.join([str(PROJECT.parent.parent), os.environ.get("PYTHONPATH", "")]), **extra}
    proc = subprocess.run([python, "-c", WITHOUT_PSYCOPG3, str(PROJECT / "manage.py"), *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"manage.py {' '.join(args)} exited {proc.returncode}\n{output[-8000:]}"
    return output


@pytest.fixture
def test_database_rights(cluster: LocalCluster) -> Iterator[None]:
    """Let the application user create and drop Django's test database, as a CI user can."""
    name = f"test_{cluster.database}"
    if cluster.engine == "postgres":
        cluster.primary._admin(f'ALTER ROLE "{cluster.user}" CREATEDB')
    else:
        for host in ("127.0.0.1", "localhost"):
            cluster.primary._admin(f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{cluster.user}'@'{host}'")
    try:
        yield
    finally:
        if cluster.engine == "postgres":
            cluster.primary._admin(f'DROP DATABASE IF EXISTS "{name}"')
            cluster.primary._admin(f'ALTER ROLE "{cluster.user}" NOCREATEDB')
        else:
            cluster.primary._admin(f"DROP DATABASE IF EXISTS `{name}`")
            for host in ("127.0.0.1", "localhost"):
                cluster.primary._admin(f"REVOKE ALL PRIVILEGES ON `{name}`.* FROM '{cluster.user}'@'{host}'")
        for replica in cluster.replicas:
            cluster.resume_replication(replica)


@pytest.mark.slow
def test_django_project(cluster: LocalCluster, test_database_rights: None, django_python: str, tmp_path: Path) -> None:
    state = tmp_path / "cluster.json"
    cluster.save_state(state)
    out = manage(django_python, cluster, state, "test", "shop", "--noinput", "-v", "2", timeout=600,
                 DBROUTER_DJANGO_REQUESTS=str(REQUESTS))
    assert re.search(r"^Ran \d+ tests", out, re.MULTILINE) and "\nOK" in out, out[-5000:]
    stale = result(out, "stale-reads")
    assert int(stale["requests"]) == REQUESTS
    assert int(stale["stale"]) == 0
    assert float(stale["share"]) >= 0.8
    assert stale["control_missed"] == "True"


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mysql)])
def test_django_kill_primary_promote(engine: str, django_python: str, tmp_path: Path) -> None:
    with make_cluster(engine, replicas=2) as own:
        name = f"test_{own.database}"
        if engine == "postgres":
            own.primary._admin(f'ALTER ROLE "{own.user}" CREATEDB')
        else:
            for host in ("127.0.0.1", "localhost"):
                own.primary._admin(f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{own.user}'@'{host}'")
        state = tmp_path / "cluster.json"
        own.save_state(state)
        out = manage(django_python, own, state, "test", "shop.tests.KillPrimaryPromote", "--noinput", "-v", "2", timeout=300,
                     DBROUTER_TEST_FAILOVER="1")
        failover = result(out, "failover")
        assert "Ran 1 test" in out and "skipped" not in out, out[-3000:]
        assert float(failover["writes_back_after"]) <= 2 * 0.2, failover  # 2 health intervals


def test_the_postgresql_backend_takes_no_other_driver() -> None:
    """Django runs on psycopg2 here, so its routers must too: the driver option is refused."""
    from django.core.exceptions import ImproperlyConfigured

    from dbrouter.integrations.django import _cluster

    settings = {"NAME": "shop", "HOST": "db1", "OPTIONS": {"dbrouter": {"driver": "psycopg"}}}
    with pytest.raises(ImproperlyConfigured, match="PostgreSQL backend runs on psycopg2, got 'psycopg'"):
        _cluster(settings, "postgres")
    settings["OPTIONS"]["dbrouter"]["driver"] = "psycopg2"
    assert _cluster(settings, "postgres")[1] == "postgresql://db1/shop"


def test_the_test_database_is_waited_for_on_the_replicas(cluster: LocalCluster, test_database_rights: None) -> None:
    """The test runner makes the test database on the primary; the replicas get it by
    replication. Until each replica takes connections to it, the creation waits: before,
    the new router's first probes found the replicas refusing it ("database does not
    exist"), their breakers opened, and the first tests read from the primary (CI saw the
    replica alias on the primary)."""
    import threading
    from urllib.parse import urlsplit

    from dbrouter.integrations.django import wait_for_replicas

    name = f"test_{cluster.database}"
    url = urlsplit(cluster.primary.url)
    settings = {"NAME": name, "HOST": url.hostname, "PORT": url.port, "USER": url.username,
                "PASSWORD": url.password or "",
                "OPTIONS": {"replicas": [f"127.0.0.1:{r.port}" for r in cluster.replicas]}}
    late = cluster.replicas[1]
    cluster.pause_replication(late)
    engine = "postgres" if cluster.engine == "postgres" else "mysql"  # the backends' own names
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (wait_for_replicas(settings, engine, timeout=30), done.set()),
                              daemon=True)
    if cluster.engine == "postgres":
        cluster.primary._admin(f'CREATE DATABASE "{name}"')
    else:
        cluster.primary._admin(f"CREATE DATABASE `{name}`")
    waiter.start()
    assert not done.wait(1.5), "returned while a replica had not replayed the CREATE DATABASE"
    cluster.resume_replication(late)
    assert done.wait(20), "still waiting after the replica replayed it"
