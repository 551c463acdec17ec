"""examples/fastapi_app.py on the suite's clusters, through Starlette's TestClient (the app's
lifespan opens and closes its AsyncRouter on the client's event loop).

Create-then-read requests while replay pauses on every replica 1 s at a time: no request
reads a stale row, and replicas still serve reads.
"""

from __future__ import annotations

import importlib.util
import threading
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi.testclient import TestClient

from dbrouter.aio import AsyncRouter

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
REQUESTS = 300


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastapi_app_reads_its_writes_while_replay_pauses(cluster: Any) -> None:
    module = load_example()
    table = f"fastapi_items_{uuid.uuid4().hex[:8]}"
    router = AsyncRouter(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2,
                         causal_wait=0.02)
    app = module.create_app(router, table=table)
    stop = threading.Event()

    def pause_replay() -> None:
        while not stop.is_set():
            for replica in cluster.replicas:
                cluster.pause_replication(replica)
            stop.wait(1.0)
            for replica in cluster.replicas:
                cluster.resume_replication(replica)
            stop.wait(0.3)

    pauser = threading.Thread(target=pause_replay, daemon=True)
    try:
        with TestClient(app) as http:
            assert http.get("/healthz").json()["ok"] is True
            pauser.start()
            stale = 0
            for i in range(REQUESTS):
                created = http.post("/items", json={"name": f"item {i}"})
                assert created.status_code == 201, created.text
                item = created.json()
                assert item["name"] == f"item {i}"
                fetched = http.get(f"/items/{item['id']}")
                stale += fetched.status_code != 200
            assert http.post("/items", json={"name": " "}).status_code == 400
            assert http.get("/items/nope").status_code == 404
            stats = router.stats()
    finally:
        stop.set()
        if pauser.is_alive():
            pauser.join(10)
        for replica in cluster.replicas:
            cluster.resume_replication(replica)
        cluster.primary.query(f"DROP TABLE IF EXISTS {table}", database=cluster.database)
    assert stale == 0
    # Replicas served the reads that could go to them: not every read fell back to the primary.
    assert stats["causal_primary_reads"] < REQUESTS * 2, stats
    assert stats["reads"] >= REQUESTS * 2
