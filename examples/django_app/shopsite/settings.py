"""Settings of the example project: one cluster, a primary alias and a replica alias.

The cluster comes from DBROUTER_PRIMARY / DBROUTER_REPLICAS (URLs, as for the other examples);
DBROUTER_DJANGO_OPTIONS may hold a JSON object of router options (``{"causal_wait": 0.05}``).
What a real project writes is the DATABASES dict below, with its own hosts in it.
"""

import json
import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = "example-only-not-secret"
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "shopsite.urls"
INSTALLED_APPS = ["shop"]
MIDDLEWARE = [
    # Before anything that queries: each request reads its own writes.
    "dbrouter.integrations.django.ReadYourWritesMiddleware",
]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASE_ROUTERS = ["dbrouter.integrations.django.ReplicaRouter"]


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


_primary = urlsplit(os.environ.get("DBROUTER_PRIMARY", "postgresql://app:secret@127.0.0.1:5432/shop"))
_engine = "postgresql" if _primary.scheme in ("postgresql", "postgres") else "mysql"
_replicas = [_host(url) for url in os.environ.get("DBROUTER_REPLICAS", "").split(",") if url.strip()]

DATABASES = {
    "default": {
        "ENGINE": f"dbrouter.integrations.django.{_engine}",
        "NAME": unquote(_primary.path.lstrip("/")),
        "USER": unquote(_primary.username or ""),
        "PASSWORD": unquote(_primary.password or ""),
        "HOST": _primary.hostname,
        "PORT": str(_primary.port or ""),
        "CONN_MAX_AGE": 0,  # each request gives its connection back to dbrouter's pool
        "OPTIONS": {
            "replicas": _replicas,
            "dbrouter": {
                "statement_timeout": 10,
                "connect_timeout": 3,
                "failover_wait": 5,
                **json.loads(os.environ.get("DBROUTER_DJANGO_OPTIONS", "{}")),
            },
        },
    },
    "replica": {
        "ENGINE": f"dbrouter.integrations.django.{_engine}",
        "OPTIONS": {"replica_of": "default"},
        "TEST": {"MIRROR": "default"},
    },
}
