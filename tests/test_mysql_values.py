"""Parameter values reach MariaDB exactly as given, on mysql-connector's C extension and (with
``--mysql-pure``) its pure-Python connection.

The connector's cursors run a multi-statement splitter over the statement after the values were
put into it (``split_multi_statement`` in ``mysql/connector/_scripting.py``), and that splitter
takes ``DELIMITER`` followed by whitespace for its client command when the quotes after it pair
up: the value ``"DELIMITER $$ '"`` was stored as ``";\\n'"``. Every path of the sync adapter that
sends parameters is tried here through the router: `write` (sequence and mapping parameters),
`read`, a transaction's `read` on the primary, `write_many` (the multi-row INSERT, rows as
mappings, a statement other than INSERT) and `stream`.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dbrouter import Router

pytestmark = pytest.mark.mysql

FAST = {"health_interval": 0.2, "min_size": 1, "max_size": 4}

# Values the splitter changed (or could): its command in either case, with the delimiters
# scripts use, quotes that pair up after it, semicolons and newlines, comment markers.
VALUES = [
    "DELIMITER $$ '",
    "delimiter // '",
    "delimiter ; \"",
    "DeLiMiTeR ;; '' x",
    "x'\nDELIMITER //\n'",
    "DELIMITER //\nSELECT 1//\nDELIMITER ;\n'",
    "DELIMITER\t;;'; SELECT 2; '",
    "a;\nb;\n'c';\n",
    "; DELIMITER ; ; '",
    "-- 'DELIMITER $$' # /* ' */",
    "%s %(v)s %% DELIMITER %s '",
]

TOKENS = ["DELIMITER", "delimiter", "Delimiter", " ", "  ", "\t", "\n", "\r\n", ";", "'", "''", '"', "`",
          "\\", "$$", "//", "--", "#", "/*", "*/", "%s", "%%", "é", "x"]
texts = st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=14).map("".join)


@pytest.fixture(scope="module")
def router(maria_cluster: Any) -> Iterator[Router]:
    with Router(maria_cluster.primary.url, [n.url for n in maria_cluster.replicas], **FAST) as opened:
        opened.wait_for_probes(1)
        yield opened


@pytest.fixture(scope="module")
def values_table(maria_cluster: Any) -> Iterator[str]:
    """An ``(id, v text, b blob)`` table on the primary, for the whole module; dropped afterwards."""
    name = "vals_" + uuid.uuid4().hex[:10]
    maria_cluster.primary.query(f"CREATE TABLE {name} (id bigint primary key, v text, b blob) CHARACTER SET utf8mb4")
    maria_cluster.wait_replicated(timeout=30)
    yield name
    maria_cluster.primary.query(f"DROP TABLE IF EXISTS {name}")
    maria_cluster.wait_replicated(timeout=60)  # the shared cluster's next test waits 10 s for its replicas


def stored(router: Router, table: str) -> dict[int, tuple[str | None, bytes | None]]:
    """The table's rows, read on the primary (inside a transaction) with a parameter."""
    with router.transaction() as tx:
        rows = tx.read(f"SELECT id, v, b FROM {table} WHERE id >= %s ORDER BY id", (0,))
    return {int(i): (v, None if b is None else bytes(b)) for i, v, b in rows}


def as_given(values: list[str], first: int = 0) -> dict[int, tuple[str | None, bytes | None]]:
    return {first + i: (v, v.encode()) for i, v in enumerate(values)}


INSERT = "INSERT INTO {} (id, v, b) VALUES (%s, %s, %s)"
MAPPED = "INSERT INTO {} (id, v, b) VALUES (%(id)s, %(v)s, %(b)s)"
UPDATE = "UPDATE {} SET v = %s, b = %s WHERE id = %s"


def by_read(router: Router, table: str, values: list[str]) -> None:
    """Each value comes back from a read (a replica's) with it as a parameter."""
    for value in values:
        assert router.read("SELECT %s", (value,)) == [(value,)]
        assert router.read("SELECT %(v)s, %(v)s = %(w)s", {"v": value, "w": value}) == [(value, 1)]


def by_stream(router: Router, table: str, values: list[str]) -> None:
    """Each value comes back from a stream with it as a parameter."""
    for value in values:
        with router.stream("SELECT %s UNION ALL SELECT %s", (value, value + "!"), batch_size=1) as rows:
            assert list(rows) == [(value,), (value + "!",)]


def by_write(router: Router, table: str, values: list[str]) -> None:
    """`write` a row at a time, sequence then mapping parameters; a transaction's reads on the
    primary find each row by its value in a WHERE clause."""
    n = len(values)
    for i, value in enumerate(values):
        assert router.write(INSERT.format(table), (i, value, value.encode())) == 1
        assert router.write(MAPPED.format(table), {"id": n + i, "v": value, "b": value.encode()}) == 1
    assert stored(router, table) == {**as_given(values), **as_given(values, n)}
    with router.transaction() as tx:
        for i, value in enumerate(values):
            found = tx.read(f"SELECT id FROM {table} WHERE v = %s AND b = %s ORDER BY id", (value, value.encode()))
            assert (i,) in found and (n + i,) in found, (value, found)


def by_write_many_insert(router: Router, table: str, values: list[str]) -> None:
    """`write_many`'s multi-row INSERTs, in one statement and cut into several."""
    rows = [(i, v, v.encode()) for i, v in enumerate(values)]
    assert router.write_many(INSERT.format(table), rows) == len(values)
    assert router.write_many(INSERT.format(table), [(len(values) + i, *row[1:]) for i, row in enumerate(rows)],
                             batch_size=2) == len(values)
    assert stored(router, table) == {**as_given(values), **as_given(values, len(values))}


def by_write_many_mappings(router: Router, table: str, values: list[str]) -> None:
    """`write_many` with rows as mappings: the connector's own multi-row rewrite."""
    rows = [{"id": i, "v": v, "b": v.encode()} for i, v in enumerate(values)]
    assert router.write_many(MAPPED.format(table), rows) == len(values)
    assert stored(router, table) == as_given(values)


def by_write_many_update(router: Router, table: str, values: list[str]) -> None:
    """`write_many` with a statement other than INSERT: once per row."""
    assert router.write_many(INSERT.format(table), [(i, "", b"") for i in range(len(values))]) == len(values)
    rows = [(v, v.encode(), i) for i, v in enumerate(values)]
    # An UPDATE to the value a row has already changes nothing (the empty value here).
    assert router.write_many(UPDATE.format(table), rows) == sum(1 for v in values if v)
    assert stored(router, table) == as_given(values)


PATHS = [by_read, by_stream, by_write, by_write_many_insert, by_write_many_mappings, by_write_many_update]


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.__name__[3:])
@pytest.mark.parametrize("value", VALUES)
def test_a_value_like_a_delimiter_command_arrives_as_given(router: Router, values_table: str, path: Any,
                                                           value: str) -> None:
    router.write(f"TRUNCATE TABLE {values_table}")
    path(router, values_table, [value])


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.__name__[3:])
def test_values_like_delimiter_commands_together(router: Router, values_table: str, path: Any) -> None:
    """All at once: the quotes of one value pair up with another's in a multi-row INSERT."""
    router.write(f"TRUNCATE TABLE {values_table}")
    path(router, values_table, VALUES)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(values=st.lists(texts, min_size=1, max_size=6))
@example(values=["DELIMITER $$ '"])
@example(values=["delimiter ;", "'", "x"])
def test_text_values_arrive_as_given(router: Router, values_table: str, values: list[str]) -> None:
    for path in PATHS:
        router.write(f"TRUNCATE TABLE {values_table}")
        path(router, values_table, values)
