"""Benchmarks of dbrouter against the connection pools people use today.

Run ``.venv/bin/python -m bench`` (or ``bench/run``); see ``bench/README.md``.
Nothing here may import ``ssl`` before ``dbrouter``: mysql-connector's C
extension has to load first (see dbrouter.adapters.preload_mysql_extension).
"""
