"""Django's PostgreSQL backend (psycopg2) on a dbrouter `Router`; see `dbrouter.integrations.django`.

Django's own backend does the SQL; this one borrows its connections from the router, on
dbrouter's psycopg2 adapter (its psycopg 3 adapter is not used here: the ``driver`` option must
be psycopg2 or absent), so Django must run on psycopg2 too: with psycopg 3 installed, Django
picks it, and this backend refuses to load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

import psycopg2.extensions
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.postgresql import base as postgresql
from django.db.backends.postgresql import client as postgresql_client
from django.db.backends.postgresql import creation as postgresql_creation
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3

from .. import RoutedCreation, RoutedWrapper

if is_psycopg3:
    raise ImproperlyConfigured(
        "dbrouter.integrations.django.postgresql runs on psycopg2 (dbrouter's psycopg2 adapter), but Django "
        "chose psycopg 3 because it is installed: uninstall psycopg (3) in this environment"
    )

__all__ = ["DatabaseClient", "DatabaseCreation", "DatabaseWrapper"]


class DatabaseCreation(RoutedCreation, postgresql_creation.DatabaseCreation):
    """Django's test database creation; the routers on the test database close before it is dropped."""

# jsonb values as text, as Django's backend registers them on its connections (JSONField
# decodes them itself); here per cursor, so the pooled connection's own cursor keeps psycopg2's
# defaults. 3802 and 3807 are jsonb's and jsonb[]'s fixed OIDs.
_JSONB = psycopg2.extensions.new_type((3802,), "JSONB_TEXT", lambda value, cursor: value)
_JSONB_ARRAY = psycopg2.extensions.new_array_type((3807,), "JSONB_TEXT[]", _JSONB)


class DatabaseClient(postgresql_client.DatabaseClient):
    """``manage.py dbshell``: psql on the cluster's current primary."""

    def runshell(self, parameters: list[str]) -> None:
        args, env = self.settings_to_cmd_args_env(self.connection.dbrouter_shell_settings(), parameters)
        env = {**os.environ, **env} if env else None
        handler = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # psql handles Ctrl-C itself, as in Django's client
            subprocess.run(args, env=env, check=True)
        finally:
            signal.signal(signal.SIGINT, handler)


class DatabaseWrapper(RoutedWrapper, postgresql.DatabaseWrapper):
    """Django's PostgreSQL ``DatabaseWrapper`` whose connections are dbrouter leases."""

    engine = "postgres"
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
        return {}

    def _prepare(self, conn: Any) -> None:
        level = self.settings_dict["OPTIONS"].get("isolation_level")
        if level is None:
            self.isolation_level = IsolationLevel.READ_COMMITTED
        else:
            try:
                self.isolation_level = IsolationLevel(level)
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {level} specified. Use one of the psycopg.IsolationLevel values."
                ) from None
            conn.isolation_level = self.isolation_level  # the pool puts the server's default back
        self._configure_connection(conn)  # time zone and role, as Django sets them on a new connection

    def _raw_cursor(self, name: str | None) -> Any:
        conn = self.connection
        # A named (server-side) cursor in autocommit mode outlives its transaction: WITH HOLD.
        cursor = conn.cursor(name, scrollable=False, withhold=conn.autocommit) if name else conn.cursor()
        cursor.tzinfo_factory = self.tzinfo_factory if settings.USE_TZ else None
        psycopg2.extensions.register_type(_JSONB, cursor)
        psycopg2.extensions.register_type(_JSONB_ARRAY, cursor)
        return cursor

    def _close_named(self) -> None:
        lease = self._lease
        if self._open_named and lease is not None:
            # Holdable cursors outlive transactions: none is left for the pool's next borrower.
            with contextlib.suppress(Exception):
                lease.node.adapter.execute(lease.conn, "CLOSE ALL")
