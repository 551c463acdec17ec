#!/usr/bin/env python
"""The example Django project's manage.py: ``python examples/django_app/manage.py runserver``.

Set DBROUTER_PRIMARY and DBROUTER_REPLICAS (as for the other examples) to your cluster:
``postgresql://app:secret@db1:5432/shop`` and a comma-separated list of replica URLs;
``mysql://`` / ``mariadb://`` URLs select the MySQL backend.
"""

import os
import sys

import dbrouter  # noqa: F401 - before anything loads ssl: mysql-connector's C extension loads first

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
