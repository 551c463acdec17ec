"""Django's MySQL / MariaDB backend on a dbrouter `Router`; see `dbrouter.integrations.django`.

dbrouter's MySQL adapter is mysql-connector-python's, so this backend builds on the Django
backend that mysql-connector ships (``mysql.connector.django``, itself built on Django's
MySQL backend), and borrows its connections from the router. The nodes connect with the
FOUND_ROWS client flag (an UPDATE reports the rows it matched, which Django's ``save()``
relies on) and Django's converter; cursors are buffered, as mysqlclient's default cursor is.
"""

from __future__ import annotations

import os
import subprocess
from functools import cached_property
from typing import Any, Iterable

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from mysql.connector.connection import MySQLConnection
from mysql.connector.cursor import MySQLCursorBuffered
from mysql.connector.django import base as connector
from mysql.connector.django import client as connector_client
from mysql.connector.django import creation as connector_creation
from mysql.connector.django.base import CursorWrapper, DjangoMySQLConverter

from .. import RoutedCreation, RoutedWrapper

_CBuffered: type[Any] | None
try:
    from mysql.connector.cursor_cext import CMySQLCursorBuffered as _CBuffered
except ImportError:  # the C extension did not load: pure Python only
    _CBuffered = None

__all__ = ["DatabaseClient", "DatabaseCreation", "DatabaseWrapper"]


class DatabaseCreation(RoutedCreation, connector_creation.DatabaseCreation):
    """Django's test database creation; the routers on the test database close before it is dropped."""


class DatabaseClient(connector_client.DatabaseClient):
    """``manage.py dbshell``: the mysql client on the cluster's current primary."""

    def runshell(self, parameters: Iterable[str] | None = None) -> None:
        args, env = self.settings_to_cmd_args_env(self.connection.dbrouter_shell_settings(), list(parameters or ()))
        env = {**os.environ, **env} if env else None
        subprocess.run(args, env=env, check=True)


class DatabaseWrapper(RoutedWrapper, connector.DatabaseWrapper):
    """mysql-connector's Django ``DatabaseWrapper`` whose connections are dbrouter leases."""

    engine = "mysql"
    client_class = DatabaseClient
    creation_class = DatabaseCreation

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        super().__init__(settings_dict, alias)
        self._init_routing()

    def get_connection_params(self) -> dict[str, Any]:
        if self._direct:
            params: dict[str, Any] = super().get_connection_params()
            params["host"], params["port"] = self.current_primary()
            return params
        level = self.settings_dict["OPTIONS"].get("isolation_level")
        if level:
            level = str(level).lower()
            if level not in self.isolation_levels:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level '{level}' specified.\n"
                    f"Use one of {', '.join(repr(name) for name in sorted(self.isolation_levels))}, or None."
                )
        self.isolation_level = level or None  # set per connection by init_connection_state
        return {}

    def _prepare(self, conn: Any) -> None:
        if not isinstance(getattr(conn, "converter", None), DjangoMySQLConverter):
            conn.set_converter_class(DjangoMySQLConverter)

    def _raw_cursor(self, name: str | None) -> Any:
        conn = self.connection
        # The classes conn.cursor(buffered=True) would pick, made directly: cursor() pings
        # the server first, one round trip more for every query.
        if _CBuffered is not None and not isinstance(conn, MySQLConnection):
            return CursorWrapper(_CBuffered(conn))
        return CursorWrapper(MySQLCursorBuffered(conn))

    @cached_property
    def mysql_is_mariadb(self) -> bool:
        """MariaDB or MySQL (mysql-connector's backend says MySQL for both)."""
        return "mariadb" in str(self.mysql_server_info).lower()

    @cached_property
    def display_name(self) -> str:
        return "MariaDB" if self.mysql_is_mariadb else "MySQL"

    @cached_property
    def data_types(self) -> dict[str, str]:  # type: ignore[override]  # a class attribute in the connector's
        types = dict(connector.DatabaseWrapper.data_types)
        features: Any = self.__dict__.get("features") or super().__getattribute__("features")
        if features.has_native_uuid_field:
            types["UUIDField"] = "uuid"  # as Django's MySQL backend does on MariaDB 10.7+
        return types

    @cached_property
    def mysql_version(self) -> tuple[int, ...]:
        wrapper: Any = self
        with wrapper.temporary_connection():
            return tuple(wrapper.connection.server_version)
