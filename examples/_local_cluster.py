"""Shared by the examples: a throwaway local cluster when DBROUTER_PRIMARY is not set.

In your application you would not need this: set ``DBROUTER_PRIMARY`` and
``DBROUTER_REPLICAS`` (or write a TOML file) and call ``Router.from_config()``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def local_cluster_unless_configured(engine: str = "postgres") -> Iterator[None]:
    """Run the block with ``DBROUTER_PRIMARY`` / ``DBROUTER_REPLICAS`` set.

    If ``DBROUTER_PRIMARY`` is already set (your cluster, or the tests'), do nothing.
    Otherwise start a local primary + 2 replicas from the installed server binaries
    (``bash scripts/setup.sh`` installs them), point the variables at it, and destroy
    it when the block ends, including on Ctrl-C and on ``kill`` (SIGTERM).
    """
    if os.environ.get("DBROUTER_PRIMARY"):
        yield
        return
    from dbrouter.cluster import make_cluster

    if threading.current_thread() is threading.main_thread():
        # Python's default for SIGTERM is to die on the spot, skipping `with` blocks and
        # atexit hooks: the servers would outlive us. Exit through the `with` instead.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(f"DBROUTER_PRIMARY is not set: starting a local {engine} primary + 2 replicas ...", flush=True)
    with make_cluster(engine, replicas=2) as cluster:
        os.environ["DBROUTER_PRIMARY"] = cluster.primary.url
        os.environ["DBROUTER_REPLICAS"] = ",".join(node.url for node in cluster.replicas)
        try:
            yield
        finally:
            del os.environ["DBROUTER_PRIMARY"], os.environ["DBROUTER_REPLICAS"]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)
