"""Driver adapters: one interface (`Adapter`), one module per driver.

Driver modules are imported only when a node of their engine is configured,
so an application that uses only PostgreSQL never imports mysql-connector.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from ..url import resolve_driver
from .base import Adapter, ErrorKind, ReturnState

if TYPE_CHECKING:
    from ..config import ConnectOptions
    from ..url import NodeAddress
    from .aio import AsyncAdapter

__all__ = ["Adapter", "ErrorKind", "ReturnState", "make_adapter", "make_async_adapter", "mysql_extension_error", "preload_mysql_extension"]

# Driver -> (adapter module, adapter class, the driver's package, the dbrouter extra that installs it).
_ADAPTERS = {
    "psycopg2": ("dbrouter.adapters.postgres", "PostgresAdapter", "psycopg2", "postgres"),
    "psycopg": ("dbrouter.adapters.psycopg", "PsycopgAdapter", "psycopg", "psycopg"),
    "mysql-connector": ("dbrouter.adapters.mysql", "MySQLAdapter", "mysql.connector", "mysql"),
}


# The asyncio flavours, by engine: (module, class); each wraps the same driver's sync adapter,
# named by its "sync" attribute (module, class), which the control plane probes with.
_ASYNC_ADAPTERS = {
    "postgres": ("dbrouter.adapters.psycopg_async", "AsyncPsycopgAdapter"),
    "mysql": ("dbrouter.adapters.mysql_aio", "AsyncMySQLAdapter"),
}


def make_adapter(address: NodeAddress, options: ConnectOptions | None = None) -> Adapter:
    """The adapter for ``address``'s driver (its URL scheme's, else ``options.driver``, else
    the engine's default), importing the driver on first use.

    Raises `ConfigurationError` when the scheme and the option name different drivers, and
    when the driver is not installed or does not load (naming the extra to install).
    """
    driver = resolve_driver(address, options.driver if options is not None else None)
    module_name, class_name, package, extra = _ADAPTERS[driver]
    if module_name not in sys.modules:
        problem = None
        if importlib.util.find_spec(package.split(".")[0]) is None:
            problem = "is not installed"
        elif driver != "mysql-connector":  # mysql-connector is loaded by its adapter, after its C extension
            try:
                importlib.import_module(package)
            except ImportError as exc:  # psycopg without a libpq it can load, a broken install
                problem = f"does not load ({exc})"
        if problem is not None:
            raise ConfigurationError(
                f"{address.engine} node {address.name} uses the {driver} driver, which {problem}: "
                f"pip install 'dbrouter[{extra}]'"
            )
    module = importlib.import_module(module_name)
    cls: type[Adapter] = getattr(module, class_name)
    return cls(address, options)


def make_async_adapter(address: NodeAddress, options: ConnectOptions | None = None) -> AsyncAdapter:
    """The asyncio adapter for ``address.engine`` (over its sync twin), importing its driver
    on first use."""
    module_name, class_name = _ASYNC_ADAPTERS[address.engine]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    adapter: AsyncAdapter = cls.for_address(address, options)
    return adapter


# What the first attempt to load mysql-connector's C extension found: None when it loaded
# (or was never tried), else why not (the ImportError's text, or that it is not installed).
_mysql_extension_error: str | None = None


def preload_mysql_extension() -> bool:
    """Load mysql-connector's C extension before anything imports ``ssl``.

    The extension bundles its own OpenSSL under the system library's name; once
    Python's ``ssl`` or ``hashlib`` has loaded an older system one, the extension
    fails to import and the connector falls back to pure Python (about 50 us
    slower per query). Returns True when the extension is usable; otherwise the
    reason is kept for `mysql_extension_error` (the MySQL adapter logs it once,
    when a MySQL node is first configured: a PostgreSQL-only application hears
    nothing of it).
    """
    global _mysql_extension_error
    if "_mysql_connector" in sys.modules:
        return True
    try:
        if importlib.util.find_spec("_mysql_connector") is None:
            reason = "mysql-connector's C extension (_mysql_connector) is not installed"
        else:
            importlib.import_module("_mysql_connector")
            return True
    except ImportError as exc:
        reason = f"import _mysql_connector failed: {exc}"
    if _mysql_extension_error is None:  # the first failure names the cause; later ones repeat it
        _mysql_extension_error = reason
    return False


def mysql_extension_error() -> str | None:
    """Why mysql-connector's C extension is not in use (None when it loaded)."""
    if "_mysql_connector" in sys.modules:
        return None
    return _mysql_extension_error or "mysql-connector's C extension was not loaded"
