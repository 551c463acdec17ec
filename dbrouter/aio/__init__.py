"""dbrouter for asyncio: `AsyncRouter` (see `dbrouter.aio.router`), its pool and lease."""

from .router import AsyncRouter, AsyncSession, AsyncTransaction

__all__ = ["AsyncRouter", "AsyncSession", "AsyncTransaction"]
