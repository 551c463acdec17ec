"""The Docker Compose stacks under compose/ and the dbrouter.toml beside each.

Docker does not run on the machines that run this suite, and ``docker compose`` is
not installed there either (the docker CLI is, without its compose plugin:
``docker compose version`` fails), so the files are not validated with
``docker compose config``. These tests check instead what a stack needs in order
to work: the structure Compose reads, pinned images, health checks, ports bound
to 127.0.0.1, replicas that wait for a healthy primary and point at it, scripts
that parse, and a dbrouter.toml that dbrouter loads and that points at the
published ports.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbrouter.config import load_router_config
from dbrouter.url import parse_address

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


@dataclass(frozen=True)
class Stack:
    name: str
    image: str  # image name; the tag must pin this major version
    major: str
    engine: str  # dbrouter adapter engine
    primary: str
    replicas: tuple[str, ...]
    ports: tuple[int, ...]  # published host ports: primary first
    user_env: str  # the environment variable naming the application user
    password_env: str
    database_env: str

    @property
    def dir(self) -> Path:
        return COMPOSE / self.name

    def load(self) -> dict[str, Any]:
        with (self.dir / "compose.yaml").open() as fh:
            data: dict[str, Any] = yaml.safe_load(fh)
        return data


STACKS = [
    Stack("postgres", "postgres", "16", "postgres", "pg-primary", ("pg-replica1", "pg-replica2"),
          (5432, 5433, 5434), "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"),
    Stack("mysql", "mysql", "8", "mysql", "mysql-primary", ("mysql-replica",),
          (3306, 3307), "MYSQL_USER", "MYSQL_PASSWORD", "MYSQL_DATABASE"),
    Stack("mariadb", "mariadb", "11", "mysql", "mariadb-primary", ("mariadb-replica",),
          (3316, 3317), "MARIADB_USER", "MARIADB_PASSWORD", "MARIADB_DATABASE"),
]
PARAMS = [pytest.param(stack, id=stack.name) for stack in STACKS]


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) for each short-syntax port mapping."""
    result = []
    for entry in service.get("ports", []):
        assert isinstance(entry, str), f"use the short port syntax: {entry!r}"
        host, host_port, container_port = entry.split(":")
        result.append((host, int(host_port), int(container_port)))
    return result


def env(service: dict[str, Any]) -> dict[str, str]:
    values = service.get("environment", {})
    if isinstance(values, list):
        values = dict(item.split("=", 1) for item in values)
    return {str(k): str(v) for k, v in values.items()}


@pytest.mark.parametrize("stack", PARAMS)
def test_services_images_and_health_checks(stack: Stack) -> None:
    data = stack.load()
    assert "version" not in data  # obsolete in the Compose specification
    assert data["name"] == f"dbrouter-{stack.name}"
    services = data["services"]
    assert set(services) == {stack.primary, *stack.replicas}
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(rf"{stack.image}:{stack.major}(\.\d+)?", image), f"{name}: {image} is not pinned to {stack.major}"
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert check["retries"] >= 10 and check["interval"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (stack.dir / source).is_file(), f"{name} mounts missing {source}"
            else:
                assert source in data["volumes"], f"{name}: named volume {source} is not declared"


@pytest.mark.parametrize("stack", PARAMS)
def test_ports_are_published_on_loopback_only(stack: Stack) -> None:
    services = stack.load()["services"]
    ports = []
    for name in (stack.primary, *stack.replicas):
        mappings = published(services[name])
        assert len(mappings) == 1, name
        host, host_port, container_port = mappings[0]
        assert host == "127.0.0.1", f"{name} publishes on {host}"
        assert container_port == (5432 if stack.engine == "postgres" else 3306)
        ports.append(host_port)
    assert tuple(ports) == stack.ports


@pytest.mark.parametrize("stack", PARAMS)
def test_replicas_wait_for_a_healthy_primary_and_follow_it(stack: Stack) -> None:
    services = stack.load()["services"]
    primary = services[stack.primary]
    assert "depends_on" not in primary
    server_ids = set()
    for name in stack.replicas:
        replica = services[name]
        assert replica["depends_on"] == {stack.primary: {"condition": "service_healthy"}}, name
        if stack.name == "postgres":
            assert env(replica)["PRIMARY_HOST"] == stack.primary
            assert replica["entrypoint"][-1].endswith("replica-entrypoint.sh")
        elif stack.name == "mariadb":
            assert env(replica)["MARIADB_MASTER_HOST"] == stack.primary
            for key in ("MARIADB_REPLICATION_USER", "MARIADB_REPLICATION_PASSWORD"):
                assert env(replica)[key] == env(primary)[key]
        else:
            script = (stack.dir / "replica-init.sql").read_text()
            assert f"SOURCE_HOST = '{stack.primary}'" in script and "SOURCE_AUTO_POSITION = 1" in script
            assert "START REPLICA" in script
        if stack.engine == "mysql":
            args = replica["command"]
            assert "--read-only=ON" in args, name
            # The database and app user come from the primary by replication; creating
            # them on the replica too would stop replication with a duplicate.
            assert not {stack.user_env, stack.database_env} & set(env(replica)), name
    if stack.engine == "mysql":
        for name in (stack.primary, *stack.replicas):
            ids = [arg for arg in services[name]["command"] if arg.startswith("--server-id=")]
            assert len(ids) == 1, name
            server_ids.add(ids[0])
        assert len(server_ids) == 1 + len(stack.replicas)
    if stack.name == "mysql":
        for name in (stack.primary, *stack.replicas):
            assert {"--gtid-mode=ON", "--enforce-gtid-consistency=ON"} <= set(services[name]["command"]), name


def test_shell_scripts_parse() -> None:
    scripts = sorted(COMPOSE.rglob("*.sh"))
    assert scripts, "no scripts found"
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


@pytest.mark.parametrize("stack", PARAMS)
def test_dbrouter_toml_points_at_the_published_ports(stack: Stack) -> None:
    config = load_router_config(stack.dir / "dbrouter.toml")
    primary_env = env(stack.load()["services"][stack.primary])
    urls = [config.primary, *(replica.url for replica in config.replicas)]
    assert len(urls) == len(stack.ports)
    for url, port in zip(urls, stack.ports):
        address = parse_address(url)
        assert (address.engine, address.host, address.port) == (stack.engine, "127.0.0.1", port)
        assert address.user == primary_env[stack.user_env]
        assert address.password == primary_env[stack.password_env]
        assert address.database == primary_env[stack.database_env]
    assert [replica.name for replica in config.replicas] == list(stack.replicas)


def test_readme_starts_every_stack() -> None:
    readme = (COMPOSE / "README.md").read_text()
    for stack in STACKS:
        assert f"docker compose -f compose/{stack.name}/compose.yaml up -d" in readme
        assert f"compose/{stack.name}" in readme
