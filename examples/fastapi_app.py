"""A FastAPI app on an AsyncRouter: every request reads its own writes.

    pip install 'dbrouter[async]' fastapi uvicorn
    DBROUTER_PRIMARY=postgresql://app@db1/app DBROUTER_REPLICAS=postgresql://app@db2/app \\
        uvicorn examples.fastapi_app:app

Endpoints:
    POST /items          {"name": ...}: insert on the primary, answer with the item read back
    GET  /items/{id}     one item, seen by the request that wrote it and after
    GET  /healthz        the router's view of the cluster (503 when the primary is down)

One AsyncRouter per process, opened and closed with the app (its lifespan), built
from the DBROUTER_* environment by ``create_app()``. Each request gets a session of
its own (a FastAPI dependency): after a write, the request's reads go to a replica
only once it has replayed that write (waiting up to ``causal_wait``), else to the
primary. Across requests, a client that must see its own write passes it along
(here the item's id, read with the same rule: a replica that lacks the row is
followed by the primary before answering 404).
"""

from __future__ import annotations

import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator

import dbrouter  # noqa: F401 - first: it loads the MySQL driver's C extension before anything loads ssl
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from dbrouter.aio import AsyncRouter, AsyncSession


class NewItem(BaseModel):
    name: str


async def request_session(request: Request) -> AsyncSession:
    """One read-your-writes session per request, from the app's router."""
    router: AsyncRouter = request.app.state.router
    return router.session()


# At module level: FastAPI reads the endpoints' annotations by name.
Session = Annotated[AsyncSession, Depends(request_session)]


def create_app(router: AsyncRouter | None = None, *, table: str = "example_items") -> FastAPI:
    """The app; ``router`` defaults to ``AsyncRouter.from_config()`` (the DBROUTER_* environment)."""
    if router is None:
        router = AsyncRouter.from_config()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with router:
            # Ids are made here, not by the database: portable across PostgreSQL and MariaDB.
            await router.write(f"CREATE TABLE IF NOT EXISTS {table} (id VARCHAR(32) PRIMARY KEY, "
                               "name VARCHAR(100) NOT NULL)")
            yield

    app = FastAPI(lifespan=lifespan)
    app.state.router = router

    @app.post("/items", status_code=201)
    async def create_item(new: NewItem, db: Session) -> dict[str, Any]:
        if not new.name.strip():
            raise HTTPException(400, "give a non-empty 'name'")
        item_id = uuid.uuid4().hex
        await db.write(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (item_id, new.name))
        rows = await db.read(f"SELECT id, name FROM {table} WHERE id = %s", (item_id,))
        return {"id": rows[0][0], "name": rows[0][1]}

    @app.get("/items/{item_id}")
    async def get_item(item_id: str, db: Session) -> dict[str, Any]:
        rows = await db.read(f"SELECT id, name FROM {table} WHERE id = %s", (item_id,))
        if not rows:
            # Created by another request a moment ago, perhaps: the primary has the last word.
            async with router.transaction() as tx:
                rows = await tx.read(f"SELECT id, name FROM {table} WHERE id = %s", (item_id,))
        if not rows:
            raise HTTPException(404, "no such item")
        return {"id": rows[0][0], "name": rows[0][1]}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        stats = router.stats()
        primary = stats["nodes"][stats["primary"]]
        ok = primary["healthy"] and primary["breaker"] == "closed"
        body = {"primary": stats["primary"], "ok": ok,
                "replicas_serving": [name for name, node in stats["nodes"].items() if node["serving_reads"]]}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


def __getattr__(name: str) -> Any:
    # ``uvicorn examples.fastapi_app:app``: the app is built when the server asks for it.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["create_app"]
