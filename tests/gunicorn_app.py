"""A WSGI app for tests/test_fork.py: it builds its Router at import, as an app served by
``gunicorn --preload`` does, so that every worker is a fork of the process that built it.

The cluster comes from ``DBROUTER_PRIMARY`` / ``DBROUTER_REPLICAS``. ``GET /?token=N``
runs a read and a transaction that each send N back with the server session that
answered (its server's port and its id), and answers them with the worker's pid and its dbrouter threads as JSON.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable
from urllib.parse import parse_qs

import dbrouter

router = dbrouter.Router.from_config(None, health_interval=0.2, min_size=2, max_size=4, statement_timeout=10,
                                     connect_timeout=5)
# The server session that answers: its server's port and its id there.
BACKEND = ("inet_server_port(), pg_backend_pid()" if router.primary.adapter.engine == "postgres"
           else "@@port, CONNECTION_ID()")
for _ in range(3):  # the arbiter's pools hold idle connections when it forks its workers
    router.read(f"SELECT 1, {BACKEND}")
    with router.transaction() as warm:
        warm.execute("SELECT 1")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    token = int(parse_qs(environ.get("QUERY_STRING", "")).get("token", ["0"])[0])
    read = router.read(f"SELECT %s, {BACKEND}", (token,))[0]
    with router.transaction() as tx:
        tx.execute(f"SELECT %s, {BACKEND}", (token,))
        written = tx.fetchone()
    assert written is not None
    body = json.dumps({
        "pid": os.getpid(),
        "tokens": [int(read[0]), int(written[0])],
        "backends": [[int(read[1]), int(read[2])], [int(written[1]), int(written[2])]],
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("dbrouter")),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
