"""Integrations with other libraries; each module imports its library only when imported itself.

- `dbrouter.integrations.sqlalchemy`: SQLAlchemy engines and ORM sessions on dbrouter's
  pools (install the ``sqlalchemy`` extra).
"""

from __future__ import annotations
