"""Driver adapters: one interface (`Adapter`), one module per driver.

Driver modules are imported only when a node of their engine is configured,
so an application that uses only PostgreSQL never imports mysql-connector.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

from .base import Adapter, ErrorKind, ReturnState

if TYPE_CHECKING:
    from ..config import ConnectOptions
    from ..url import NodeAddress

__all__ = ["Adapter", "ErrorKind", "ReturnState", "make_adapter", "preload_mysql_extension"]

log = logging.getLogger("dbrouter.adapters")

_ADAPTERS = {
    "postgres": ("dbrouter.adapters.postgres", "PostgresAdapter"),
    "mysql": ("dbrouter.adapters.mysql", "MySQLAdapter"),
}


def make_adapter(address: NodeAddress, options: ConnectOptions | None = None) -> Adapter:
    """The adapter for ``address.engine``, importing its driver on first use."""
    module_name, class_name = _ADAPTERS[address.engine]
    module = importlib.import_module(module_name)
    cls: type[Adapter] = getattr(module, class_name)
    return cls(address, options)


def preload_mysql_extension() -> bool:
    """Load mysql-connector's C extension before anything imports ``ssl``.

    The extension bundles its own OpenSSL under the system library's name; once
    Python's ``ssl`` or ``hashlib`` has loaded the system one, the extension fails
    to import and the connector silently falls back to pure Python (about 50 us
    slower per query). Returns True when the extension is usable.
    """
    if "_mysql_connector" in sys.modules:
        return True
    if importlib.util.find_spec("_mysql_connector") is None:
        return False  # not installed: the connector runs in pure Python
    try:
        importlib.import_module("_mysql_connector")
    except ImportError as exc:
        log.warning(
            "mysql-connector's C extension did not load (%s): it must load before anything "
            "loads OpenSSL (the ssl or hashlib modules). Import dbrouter first, or add a .pth "
            "file as scripts/setup.sh does. Falling back to pure Python.", exc,
        )
        return False
    return True
