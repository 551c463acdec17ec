"""A small Flask app on a Router: reads from replicas, writes to the primary.

    pip install flask
    PORT=5000 python examples/flask_app.py
    curl -X POST -H 'Content-Type: application/json' -d '{"name": "pen"}' 'localhost:5000/items?echo=1'

Endpoints:
    GET  /items          all items, read from a replica (may lag a write by a few ms)
    POST /items          {"name": ...}: insert on the primary, answer with the new item
    POST /items?echo=1   the same, and read it back from the database in a router.session()
    GET  /items/<id>     one item: a replica, and the primary before answering 404
    GET  /healthz        the router's view of the cluster (503 when the primary is down)
    GET  /metrics        Prometheus metrics (dbrouter.metrics.RouterCollector)

One Router per process, shared by every request (it is thread-safe), built from
DBROUTER_PRIMARY / DBROUTER_REPLICAS by create_app(). Run directly without those
variables, it starts a local PostgreSQL cluster.
"""

from __future__ import annotations

import uuid
from typing import Any

import dbrouter  # import it early: it loads the MySQL driver's C extension before anything loads ssl
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dbrouter.metrics import RouterCollector


def create_app(router: dbrouter.Router | None = None, *, table: str = "example_items") -> Flask:
    """The app; ``router`` defaults to ``Router.from_config()`` (the DBROUTER_* environment).

    The app keeps the router in ``app.extensions["dbrouter"]``: close it when the
    process ends (``router.close()``).
    """
    if router is None:
        router = dbrouter.Router.from_config()
    app = Flask(__name__)
    app.extensions["dbrouter"] = router
    # Portable across PostgreSQL and MySQL/MariaDB. Ids are made here, not by the
    # database, so that an insert needs no RETURNING / LAST_INSERT_ID().
    router.write(f"CREATE TABLE IF NOT EXISTS {table} (id VARCHAR(32) PRIMARY KEY, name VARCHAR(100) NOT NULL)")

    registry = CollectorRegistry()
    registry.register(RouterCollector(router))

    def item(row: tuple[Any, ...]) -> dict[str, Any]:
        return {"id": row[0], "name": row[1]}

    @app.get("/items")
    def list_items() -> Any:
        # A replica answers: cheap, and a few milliseconds behind the primary at worst.
        rows = router.read(f"SELECT id, name FROM {table} ORDER BY name, id")
        return jsonify([item(row) for row in rows])

    @app.post("/items")
    def create_item() -> Any:
        name = (request.get_json(silent=True) or {}).get("name")
        if not isinstance(name, str) or not name.strip():
            return jsonify(error="give a JSON body with a non-empty 'name'"), 400
        new_id = uuid.uuid4().hex
        insert = f"INSERT INTO {table} (id, name) VALUES (%s, %s)"
        if request.args.get("echo"):
            # Write, then read back in the same request: a session guarantees the read
            # sees the write (from a replica that has it, else from the primary).
            with router.session() as session:
                session.write(insert, (new_id, name))
                rows = session.read(f"SELECT id, name FROM {table} WHERE id = %s", (new_id,))
            return jsonify(item(rows[0])), 201
        router.write(insert, (new_id, name))
        return jsonify({"id": new_id, "name": name}), 201

    @app.get("/items/<item_id>")
    def get_item(item_id: str) -> Any:
        query = f"SELECT id, name FROM {table} WHERE id = %s"
        rows = router.read(query, (item_id,))
        if not rows:
            # A client that has just created the item may be ahead of the replica: ask the
            # primary (reads in a transaction go there) before saying it does not exist.
            with router.transaction() as tx:
                rows = tx.read(query, (item_id,))
        if not rows:
            return jsonify(error=f"no item {item_id}"), 404
        return jsonify(item(rows[0]))

    @app.get("/healthz")
    def healthz() -> Any:
        stats = router.stats()
        nodes = {
            name: {key: node[key] for key in ("role", "healthy", "breaker", "lag")}
            for name, node in stats["nodes"].items()
        }
        ok = stats["nodes"][stats["primary"]]["healthy"] and not stats["split_brain"]
        body = {"ok": ok, "primary": stats["primary"], "nodes": nodes,
                **{key: stats[key] for key in ("reads", "writes", "retries", "fallbacks", "failovers")}}
        return jsonify(body), 200 if ok else 503

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return app


if __name__ == "__main__":
    import os

    from _local_cluster import local_cluster_unless_configured

    with local_cluster_unless_configured():
        app = create_app()
        try:
            # Flask's development server; behind gunicorn use `gunicorn 'flask_app:create_app()'`.
            app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")), threaded=True)
        finally:
            app.extensions["dbrouter"].close()
