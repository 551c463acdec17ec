"""``discovery = "mysql"``: the replicas a MySQL/MariaDB primary says are connected.

``SHOW SLAVE HOSTS`` (``SHOW REPLICAS`` on MySQL 8.4, which dropped the old name) on
the current primary lists every replica whose I/O thread is connected and that set
``report_host`` (and ``report_port`` when it listens elsewhere than the primary sees
it): without ``report_host`` a replica is not listed, and this provider logs it once.
The URL's user needs the privilege to ask: ``REPLICATION MASTER ADMIN`` on MariaDB
10.5.9 and later, ``REPLICATION SLAVE`` (or ``REPLICATION CLIENT``) on MySQL; without
it every answer fails and the nodes stay as configured.
The primary itself is a member too, so that a failover changes nothing here: the next
question goes to the new primary.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from ..adapters import make_adapter
from ..adapters.base import Adapter
from ..config import ConnectOptions
from ..url import NodeAddress
from . import PRIMARY, REPLICA, DiscoveryError, Member

__all__ = ["MySQLReplicaProvider"]

log = logging.getLogger("dbrouter.discovery")

_SYNTAX_ERROR = 1064  # ER_PARSE_ERROR


class MySQLReplicaProvider:
    """Members from the current primary's list of connected replicas."""

    source = "mysql replica hosts of the primary"

    def __init__(self, primary: Callable[[], tuple[str, NodeAddress]], options: ConnectOptions) -> None:
        self._primary = primary  # (name, address) of the primary now
        self._options = options
        self._warned_hidden = False
        self._statement = "SHOW SLAVE HOSTS"

    def members(self, timeout: float) -> list[Member]:
        name, address = self._primary()
        options = dataclasses.replace(self._options, connect_timeout=max(timeout, 0.5))
        adapter = make_adapter(address, options)
        try:
            conn = adapter.connect(read_timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - named, not raised as the driver's
            raise DiscoveryError(f"{self.source} ({name}): cannot connect: {exc}") from None
        try:
            rows = self._replica_rows(adapter, conn)
        except Exception as exc:  # noqa: BLE001
            raise DiscoveryError(f"{self.source} ({name}): {self._statement} failed: {exc}") from None
        finally:
            adapter.close(conn)
        members = [Member(name, address.host, address.port, PRIMARY)]
        hidden = 0
        for row in rows:
            host, port = row[1], row[2]  # Server_id, Host, Port, ... in MariaDB and MySQL alike
            if not host:
                hidden += 1
                continue
            members.append(Member(f"{host}:{int(port)}", str(host), int(port), REPLICA))
        if hidden and not self._warned_hidden:
            self._warned_hidden = True
            log.warning("%s (%s): %d replica(s) connected without report_host are not listed: set report_host "
                        "(and report_port) on every replica", self.source, name, hidden)
        return members

    def _replica_rows(self, adapter: Adapter, conn: Any) -> list[Any]:
        execute = adapter.execute
        try:
            rows, _ = execute(conn, self._statement)
        except Exception as exc:
            if self._statement != "SHOW SLAVE HOSTS" or getattr(exc, "errno", None) != _SYNTAX_ERROR:
                raise
            self._statement = "SHOW REPLICAS"  # MySQL 8.4 knows only the new name
            rows, _ = execute(conn, self._statement)
        return list(rows or [])

    def close(self) -> None:
        """Nothing held between questions: each opens and closes its own connection."""
