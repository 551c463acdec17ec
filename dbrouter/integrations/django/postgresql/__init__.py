"""dbrouter's PostgreSQL backend for Django: ``ENGINE = "dbrouter.integrations.django.postgresql"``."""
