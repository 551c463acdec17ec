"""dbrouter's MySQL / MariaDB backend for Django: ``ENGINE = "dbrouter.integrations.django.mysql"``."""
