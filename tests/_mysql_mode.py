"""Which mysql-connector implementation this test run uses: its C extension or pure Python.

``pytest --mysql-pure`` runs the process as an application in which the C extension
failed to load: the common case when ``ssl``, ``hashlib`` or ``requests`` is imported
before dbrouter on a system whose libssl is older than the one the connector's wheel
bundles. `block_c_extension` makes ``import _mysql_connector`` fail before anything
imports mysql.connector, so the connector and dbrouter fall back to pure Python exactly
as they do there (whatever this machine's libssl is). Without it, the suite runs on the
C extension (``scripts/setup.sh`` installs a ``.pth`` file that loads it first).

A pytest option rather than an environment variable: dbrouter reads every
``DBROUTER_*`` variable as a router option, and child processes (the CLI, the
examples) would not be blocked anyway. This module imports nothing of dbrouter's or
mysql-connector's, so that a child process can call `block_c_extension` first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["BLOCKED", "OPTION", "block_c_extension", "blocked", "describe"]

OPTION = "--mysql-pure"
BLOCKED = (
    f"blocked by the test suite's {OPTION}, standing in for the usual cause: libssl.so.3: "
    "version `OPENSSL_3.2.0' not found (required by _mysql_connector)"
)


class _FailingLoader(importlib.abc.Loader):
    """Fails as a shared library that cannot be loaded does: when the module is created."""

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        raise ImportError(BLOCKED, name=spec.name)

    def exec_module(self, module: ModuleType) -> None:  # never reached
        raise ImportError(BLOCKED, name=module.__name__)


class _RefuseCExtension(importlib.abc.MetaPathFinder):
    """Finds ``_mysql_connector`` (it is installed) with a loader that fails."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if fullname == "_mysql_connector":
            return importlib.util.spec_from_loader(fullname, _FailingLoader())
        return None


def block_c_extension() -> None:
    """Make mysql-connector's C extension unimportable in this process (idempotent).

    Must run before mysql.connector is imported: the connector decides at import time.
    ``import dbrouter`` or the ``.pth`` file of ``scripts/setup.sh`` may have loaded the
    extension already; it is forgotten (the shared library stays mapped, but nothing can
    import it again).
    """
    if blocked():
        return
    imported = sorted(name for name in sys.modules if name == "mysql.connector" or name.startswith("mysql.connector."))
    if imported:
        raise RuntimeError(f"{OPTION}: mysql.connector was imported before the C extension could be blocked")
    sys.modules.pop("_mysql_connector", None)
    sys.meta_path.insert(0, _RefuseCExtension())


def blocked() -> bool:
    """Whether `block_c_extension` ran in this process."""
    return any(isinstance(finder, _RefuseCExtension) for finder in sys.meta_path)


def describe() -> str:
    """The run's mode, for the pytest header."""
    if blocked():
        return f"mysql-connector: pure Python ({OPTION}: the C extension is made to fail to load)"
    return "mysql-connector: C extension"
