"""Bulk writes and streamed reads against the real servers (issue 18).

`write_many`: COPY on PostgreSQL stores what the INSERT stores, for every type psycopg2 and
psycopg 3 adapt, each with its own INSERT as the reference (Hypothesis, against the server);
values COPY would store differently go as the INSERT; any iterable is read a batch at a time (never more than workers x batch_size rows
held); progress per batch; failed and unknown batches; MariaDB INSERTs cut to
max_allowed_packet; a failover in the middle of a load. `stream`: the rows of a replica in
bounded memory, its connection held until closed, a clear error when the node goes away
mid-stream.
"""

from __future__ import annotations

import datetime
import decimal
import math
import threading
import time
import uuid
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Json as Json3
from psycopg.types.json import Jsonb as Jsonb3
from psycopg2.extras import Json

import dbrouter
from dbrouter import BatchReport, BulkWriteError, NotAReadStatement, Router, StreamInterrupted
from dbrouter.cluster import make_cluster

from .conftest import ENGINES, PG_DRIVERS, both_drivers, port_sql, wait_until

FAST = {"health_interval": 0.2, "min_size": 1, "max_size": 6}


def make_router(cluster: Any, driver: str = "", **options: Any) -> Router:
    return Router(cluster.primary.url, [n.url for n in cluster.replicas], driver=driver, **{**FAST, **options})


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


# -- PostgreSQL: COPY stores what the INSERT stores -------------------------------------------

COLUMNS = [
    ("t", "text"), ("i4", "int4"), ("i8", "int8"), ("f8", "float8"), ("n", "numeric"), ("b", "bool"),
    ("ba", "bytea"), ("d", "date"), ("ts", "timestamp"), ("tstz", "timestamptz"), ("tm", "time"),
    ("tmtz", "timetz"), ("iv", "interval"), ("u", "uuid"), ("j", "jsonb"), ("ai", "int8[]"), ("at", "text[]"),
]
NAMES = ", ".join(name for name, _ in COLUMNS)
# Characters COPY's text format must escape, quotes and braces arrays must, and non-ASCII.
TRICKY = "\t\n\r\\ \"'{},.NULnul\\N aé€😀"
texts = st.text(st.sampled_from(TRICKY) | st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                max_size=12) | st.sampled_from(["", "NULL", "null", "\\N", "\\.", "a\tb\nc\\d"])
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: datetime.timezone(datetime.timedelta(minutes=m)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 53), 2 ** 53) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6)
VALUES = {
    "t": texts,
    "i4": st.integers(-(2 ** 31), 2 ** 31 - 1),
    "i8": st.integers(-(2 ** 63), 2 ** 63 - 1),
    "f8": st.floats(),
    "n": st.decimals(min_value=-(10 ** 20), max_value=10 ** 20, places=6) | st.just(decimal.Decimal("NaN")),
    "b": st.booleans(),
    "ba": st.binary(max_size=16),
    "d": st.dates(),
    "ts": st.datetimes(min_value=datetime.datetime(2, 1, 1)),
    "tstz": st.datetimes(min_value=datetime.datetime(2, 1, 1), max_value=datetime.datetime(9998, 1, 1), timezones=offsets),
    "tm": st.times(),
    "tmtz": st.times(timezones=offsets),
    "iv": st.timedeltas(min_value=datetime.timedelta(days=-(10 ** 6)), max_value=datetime.timedelta(days=10 ** 6)),
    "u": st.uuids(),
    "j": json_values.map(Json),
    "ai": st.lists(st.none() | st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=4),
    "at": st.lists(st.none() | texts, max_size=4),
}
ROWS = st.lists(st.tuples(*(st.none() | VALUES[name] for name, _ in COLUMNS)), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def typed_tables(pg_cluster: Any) -> Iterator[tuple[str, str]]:
    """Two tables of every type: one loaded by write_many (COPY), one by the driver's executemany."""
    names = ("bulk_copy_" + uuid.uuid4().hex[:8], "bulk_ref_" + uuid.uuid4().hex[:8])
    columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    for name in names:
        pg_cluster.primary.query(f"CREATE TABLE {name} (k int8 PRIMARY KEY, {columns})")
    yield names
    for name in names:
        pg_cluster.primary.query(f"DROP TABLE IF EXISTS {name}")
    pg_cluster.wait_replicated(timeout=60)  # the shared cluster's next test waits 10 s for its replicas


@pytest.fixture(scope="module", params=PG_DRIVERS)
def pg_router(request: pytest.FixtureRequest, pg_cluster: Any) -> Iterator[Router]:
    """A router on each PostgreSQL driver in turn (its COPY follows that driver's INSERT)."""
    with Router(pg_cluster.primary.url, [n.url for n in pg_cluster.replicas], driver=request.param, **FAST) as router:
        assert router.primary.adapter.driver == request.param
        yield router


@pytest.fixture
def inserts(monkeypatch: pytest.MonkeyPatch, pg_router: Router) -> list[int]:
    """The batches that went as the INSERT (their sizes): a COPY test expects none."""
    calls: list[int] = []
    adapter_class = type(pg_router.primary.adapter)
    original = adapter_class.execute_many

    def counted(self: Any, conn: Any, sql: str, rows: Any) -> int:
        calls.append(len(rows))
        return original(self, conn, sql, rows)

    monkeypatch.setattr(adapter_class, "execute_many", counted)
    return calls


def for_driver(router: Router, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row of the strategies' values as the router's driver takes them: psycopg 3 has JSON
    wrappers of its own (Json or Jsonb, by the row's key), and adapts UUIDs; psycopg2 adapts a
    UUID only once register_uuid() was called, so its reference INSERT gets the text it would send."""
    if router.primary.adapter.driver == "psycopg":
        wrapper = Jsonb3 if row[0] % 2 else Json3
        return tuple(wrapper(v.adapted) if isinstance(v, Json) else v for v in row)
    return tuple(v for v in row)


def _same(expected: Any, got: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(expected, decimal.Decimal) and expected.is_nan():
        return isinstance(got, decimal.Decimal) and got.is_nan()
    if isinstance(expected, bytes):
        return bytes(got) == expected
    if isinstance(expected, uuid.UUID):
        return str(expected) == got
    if isinstance(expected, Json):
        return bool(expected.adapted == got)
    if isinstance(expected, (Json3, Jsonb3)):
        return bool(expected.obj == got)
    return bool(expected == got)


@pytest.fixture
def copy_small_batches(monkeypatch: pytest.MonkeyPatch, pg_router: Router) -> None:
    """COPY from the first row on (it waits for 64 rows otherwise), so that examples stay small."""
    monkeypatch.setattr(type(pg_router.primary.adapter), "bulk_min_rows", 1)


@pytest.mark.postgres
@pytest.mark.usefixtures("copy_small_batches")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=ROWS)
def test_copy_stores_every_type_as_the_insert_does(pg_cluster: Any, pg_router: Router, typed_tables: tuple[str, str],
                                                    inserts: list[int], rows: list[tuple[Any, ...]]) -> None:
    copied, reference = typed_tables
    for name in typed_tables:
        pg_cluster.primary.query(f"TRUNCATE {name}")
    inserts.clear()
    keyed = [for_driver(pg_router, (k, *row)) for k, row in enumerate(rows)]
    marks = ", ".join(["%s"] * (len(COLUMNS) + 1))
    assert pg_router.write_many(f"INSERT INTO {copied} (k, {NAMES}) VALUES ({marks})", keyed,
                                batch_size=16, workers=2) == len(rows)
    assert inserts == [], "a batch went as the INSERT"
    psycopg2 = pg_router.primary.adapter.driver == "psycopg2"
    with pg_router.connection("write") as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {reference} (k, {NAMES}) VALUES ({marks})",
                        [tuple(str(v) if psycopg2 and isinstance(v, uuid.UUID) else v for v in row) for row in keyed])
    # Stored alike, compared by the server, column by column as text. One exception: psycopg2
    # sends -0.0 as the numeric literal -0.0, which has no sign, so the INSERT stores 0 where
    # COPY keeps the source's -0 (equal as floats, not as text; psycopg 3 sends a float8 -0).
    text = ", ".join(f"({name} + 0)::text" if kind == "float8" else f"{name}::text" for name, kind in COLUMNS)
    differ = pg_cluster.primary.query(
        f"(SELECT k, {text} FROM {copied} EXCEPT ALL SELECT k, {text} FROM {reference}) UNION ALL "
        f"(SELECT k, {text} FROM {reference} EXCEPT ALL SELECT k, {text} FROM {copied})")
    assert differ == []
    # And what was stored is the source, row for row.
    back = pg_cluster.primary.query(f"SELECT k, {NAMES} FROM {copied} ORDER BY k")
    assert len(back) == len(rows)
    for source, (k, *stored) in zip(keyed, back, strict=True):
        for (name, _), want, got in zip(COLUMNS, source[1:], stored, strict=True):
            if want is None:
                assert got is None, (k, name)
            else:
                assert _same(want, got), (k, name, want, got)


@pytest.mark.postgres
def test_values_copy_would_store_otherwise_go_as_the_insert(pg_cluster: Any, pg_router: Router,
                                                            inserts: list[int]) -> None:
    """A float for an integer column (the INSERT rounds it), an aware datetime for a
    timestamp column (the INSERT converts it to the session's time zone), a bool for a text
    column: such batches go as the INSERT and store what it stores."""
    name = "bulk_cast_" + uuid.uuid4().hex[:8]
    pg_cluster.primary.query(f"CREATE TABLE {name} (k int8 PRIMARY KEY, i int4, ts timestamp, tx text)")
    try:
        aware = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))
        plain = [(k, k, datetime.datetime(2024, 1, 1), "x") for k in range(100)]
        odd = [(100 + k, 2.5 + k, aware, True) for k in range(100)]
        sql = f"INSERT INTO {name} (k, i, ts, tx) VALUES (%s, %s, %s, %s)"
        assert pg_router.write_many(sql, plain + odd, batch_size=100, workers=1) == 200
        assert inserts == [100]  # the second batch only
        with pg_router.connection("write") as conn, conn.cursor() as cur:
            cur.execute("SELECT %s::int4, %s::timestamptz::timestamp", (2.5, aware))
            want_i, want_ts = cur.fetchone()
        assert pg_cluster.primary.query(f"SELECT i, ts, tx FROM {name} WHERE k = 100") == [(want_i, want_ts, "true")]
        assert pg_cluster.primary.query(f"SELECT count(*) FROM {name} WHERE tx = 'x' AND i = k") == [(100,)]
    finally:
        pg_cluster.primary.query(f"DROP TABLE {name}")


# Values that reach a column of another type, each alone in its batch, so that each goes by COPY
# when the driver's rules allow it. psycopg 3 sends a float as float8, which the server casts to
# numeric keeping 15 digits and to float4 rounding the double once; psycopg2 sends its text.
CROSS_TYPES = [
    ("numeric", [0.1 + 0.2, 1e300, -0.0, 1 / 3, 2.5e-300, math.inf, -math.inf, math.nan, 12345678901234567.0]),
    ("float4", [1 + 2 ** -24, 0.1, 3.4e38, 1.4e-45, -math.inf, 1e39, 1e-50, 2 ** 63 + 1, 2 ** 70, decimal.Decimal("0.1")]),
    ("float8", [2 ** 70, 2 ** 63 + 1, decimal.Decimal("0.1"), decimal.Decimal("NaN")]),
    ("numeric[]", [[0.1 + 0.2, None], [[1.5], [2 ** 70]]]),
    ("float4[]", [[1 + 2 ** -24, 0.5]]),
    ("text", [5, True, 2 ** 70]),
    ("varchar(12)", [123, False]),
    ("text[]", [[1, 2], [True, None], [1, "a"], ["a", None]]),
    ("int8[]", [["1", None, "2"], [1, 2 ** 40]]),
    ("timestamptz", [datetime.date(2024, 3, 10), datetime.datetime(2024, 3, 10, 2, 30)]),
    ("timestamp", [datetime.date(2024, 3, 10)]),
]


def _cross_cases(driver: str) -> list[tuple[str, Any]]:
    cases = [(kind, value) for kind, values in CROSS_TYPES for value in values]
    if driver == "psycopg":
        cases += [("json", Json3({"b": [1, 2], "a": "x\ty"})), ("jsonb", Json3({"b": 1, "a": 2})),
                  ("text", Json3({"b": 1})), ("jsonb", Jsonb3({"b": 1, "a": 2})), ("json", Jsonb3({"b": 1, "a": 2})),
                  ("int4", Json3(5)), ("jsonb[]", [Json3({"a": 1}), Jsonb3({"b": 2})]), ("jsonb[]", [Json3([1])])]
    else:
        cases += [("json", Json({"b": [1, 2], "a": "x\ty"})), ("jsonb", Json({"b": 1})), ("int4", Json(5)),
                  ("jsonb[]", [Json({"a": 1})])]
    return cases


@pytest.mark.postgres
@pytest.mark.usefixtures("copy_small_batches")
def test_copy_stores_values_of_another_type_as_the_drivers_insert_does(pg_cluster: Any, pg_router: Router,
                                                                       inserts: list[int]) -> None:
    """Each value, alone in a batch: COPY (when the driver's rules allow it) stores what the
    driver's INSERT stores (compared as text), or both fail."""
    driver = pg_router.primary.adapter.driver
    name = "bulk_cross_" + uuid.uuid4().hex[:8]
    primary = pg_cluster.primary
    copied_by: list[tuple[str, Any]] = []
    try:
        for index, (kind, value) in enumerate(_cross_cases(driver)):
            for table in (f"{name}_c", f"{name}_r"):
                primary.query(f"DROP TABLE IF EXISTS {table}")
                primary.query(f"CREATE TABLE {table} (k int PRIMARY KEY, v {kind})")
            inserts.clear()
            insert = "INSERT INTO {} (k, v) VALUES (%s, %s)"
            try:
                pg_router.write_many(insert.format(f"{name}_c"), [(index, value)], batch_size=10)
                copied: Any = primary.query(f"SELECT v::text FROM {name}_c")
            except BulkWriteError as exc:
                copied = type(exc.failures[0]).__name__
            if not inserts:
                copied_by.append((kind, value))
            try:
                with pg_router.connection("write") as conn, conn.cursor() as cur:
                    cur.execute(insert.format(f"{name}_r"), (index, value))
                reference: Any = primary.query(f"SELECT v::text FROM {name}_r")
            except Exception as exc:  # noqa: BLE001 - an INSERT the driver or the server refuses
                reference = type(exc).__name__
            if isinstance(reference, str) or isinstance(copied, str):
                assert isinstance(reference, str) and isinstance(copied, str), (kind, value, copied, reference)
                assert not inserts or inserts == [1], (kind, value)  # what fails goes as the INSERT
            else:
                assert copied == reference, (kind, value, copied, reference)
    finally:
        primary.query(f"DROP TABLE IF EXISTS {name}_c")
        primary.query(f"DROP TABLE IF EXISTS {name}_r")
    # The rules are exercised: floats go by COPY into numeric and float4 columns on both drivers.
    assert ("numeric", 0.1 + 0.2) in copied_by and ("float4", 1 + 2 ** -24) in copied_by
    assert ("numeric[]", [0.1 + 0.2, None]) in copied_by
    if driver == "psycopg":
        assert ("text[]", [1, "a"]) not in copied_by  # psycopg 3 refuses a list of mixed types
        assert [kind for kind, value in copied_by if isinstance(value, (Json3, Jsonb3))] == ["json", "jsonb", "text", "jsonb"]


@pytest.mark.postgres
def test_copy_plan_follows_the_statement_and_the_table(pg_cluster: Any, pg_router: Router,
                                                       inserts: list[int]) -> None:
    """No column list: COPY names the first columns (the INSERT fills those and defaults the
    rest); ON CONFLICT, RETURNING, expressions and tables with INSERT rules stay INSERTs."""
    name = "bulk_shape_" + uuid.uuid4().hex[:8]
    primary = pg_cluster.primary
    primary.query(f'CREATE TABLE {name} (k int8 PRIMARY KEY, "Mixed Case" text, d int DEFAULT 7)')
    try:
        rows = [(k, f"v{k}") for k in range(100)]
        assert pg_router.write_many(f"INSERT INTO {name} VALUES (%s, %s)", rows, batch_size=100) == 100
        assert inserts == []
        assert primary.query(f'SELECT count(*), min(d), max("Mixed Case") FROM {name}') == [(100, 7, "v99")]
        more = [(k, f"v{k}") for k in range(100, 200)]
        assert pg_router.write_many(f'INSERT INTO public.{name} ("k", "Mixed Case") VALUES (%s, %s)', more,
                                    batch_size=100) == 100
        assert inserts == []
        conflict = f'INSERT INTO {name} (k, "Mixed Case") VALUES (%s, %s) ON CONFLICT (k) DO NOTHING'
        assert pg_router.write_many(conflict, rows, batch_size=100) == 0
        assert inserts == [100]
        primary.query(f"CREATE RULE no_insert AS ON INSERT TO {name} WHERE NEW.k >= 1000 DO INSTEAD NOTHING")
        assert pg_router.write_many(f"INSERT INTO {name} (k) VALUES (%s)", [(1000 + k,) for k in range(100)],
                                    batch_size=100) == 0  # the rule, which COPY would not apply
        assert inserts == [100, 100]
        assert primary.query(f"SELECT count(*) FROM {name}") == [(200,)]
    finally:
        primary.query(f"DROP TABLE {name}")


# -- both engines: the input, progress, failures -------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3])
def test_any_iterable_is_read_a_batch_at_a_time_with_progress(cluster: Any, table: str, workers: int) -> None:
    total, batch_size = 5_025, 250
    pulled, reported, held = [0], [0], [0]
    reports: list[BatchReport] = []

    def source() -> Iterator[tuple[int, int]]:
        for i in range(total):
            pulled[0] += 1
            held[0] = max(held[0], pulled[0] - reported[0])
            yield i, i % 7

    def progress(report: BatchReport) -> None:
        assert threading.current_thread() is threading.main_thread()
        reports.append(report)
        reported[0] += report.rows

    with make_router(cluster) as router:
        count = router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)", source(), batch_size=batch_size,
                                  workers=workers, progress=progress)
    assert count == total
    assert cluster.primary.query(f"SELECT count(*), sum(id) FROM {table}") == [(total, sum(range(total)))]
    # Never more than workers x batch_size rows read and not yet reported done.
    assert held[0] <= workers * batch_size, held[0]
    assert len(reports) == 21 and {r.status for r in reports} == {"committed"}
    spans = sorted((r.index, r.first_row, r.rows) for r in reports)
    assert spans == [(i, i * batch_size, batch_size if i < 20 else 25) for i in range(21)]
    assert [r.batches_done for r in reports] == list(range(1, 22))
    assert reports[-1].rows_committed == total and all(r.rowcount == r.rows for r in reports)
    cluster.wait_replicated(timeout=60)  # the shared cluster's next test waits 10 s for its replicas


@both_drivers
def test_failed_batches_are_reported_and_the_others_commit(cluster: Any, driver: str, table: str) -> None:
    rows = [(i, 0) for i in range(250)]
    rows[120] = (110, 0)  # batch 2 (rows 100-149) holds id 110 twice: it fails, whatever the order the batches run in
    reports: list[BatchReport] = []
    with make_router(cluster, driver) as router, pytest.raises(BulkWriteError) as info:
        router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)", iter(rows), batch_size=50, workers=2,
                          progress=reports.append)
    error = info.value
    assert error.failed == [2] and error.unknown == [] and set(error.failures) == {2}
    assert "batch 2, rows 100-149" in str(error) and "1 of 5 batches failed" in str(error)
    assert error.rowcount == 200 and error.committed == [0, 1, 3, 4]
    assert {r.index: r.status for r in reports} == {0: "committed", 1: "committed", 2: "failed", 3: "committed",
                                                     4: "committed"}
    assert cluster.primary.query(f"SELECT count(*) FROM {table}") == [(200,)]


def test_an_error_in_the_input_or_progress_stops_the_load(cluster: Any, table: str) -> None:
    def broken() -> Iterator[tuple[int, int]]:
        yield from ((i, 0) for i in range(250))
        raise RuntimeError("the source broke")

    with make_router(cluster) as router:
        with pytest.raises(RuntimeError, match="the source broke"):
            router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)", broken(), batch_size=100, workers=2)
        assert cluster.primary.query(f"SELECT count(*) FROM {table}") == [(200,)]  # the batches read before it

        def stop(report: BatchReport) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)", ((1000 + i, 0) for i in range(10**9)),
                              batch_size=100, workers=2, progress=stop)
        assert 1 <= cluster.primary.query(f"SELECT count(*) FROM {table} WHERE id >= 1000")[0][0] <= 200
        assert router.stats()["nodes"][router.primary.name]["pool"]["in_use"] == 0


@pytest.mark.mysql
def test_mariadb_batches_are_cut_to_max_allowed_packet(maria_cluster: Any) -> None:
    name = "bulk_packet_" + uuid.uuid4().hex[:8]
    maria_cluster.primary.query(f"CREATE TABLE {name} (id bigint primary key, body text)")
    try:
        with make_router(maria_cluster) as router:
            router.wait_for_probes(1)
            adapter = router.primary.adapter
            adapter._max_packet = 8192  # type: ignore[attr-defined]  # as if the server said so
            rows = [(i, "é\\'\"x" * 20) for i in range(2000)]  # about 200 KiB of INSERT: 20+ statements
            assert router.write_many(f"INSERT INTO {name} (id, body) VALUES (%s, %s)", rows, batch_size=2000,
                                     workers=1) == 2000
            assert maria_cluster.primary.query(f"SELECT count(*), min(body) = max(body), max(body) FROM {name}") == \
                [(2000, 1, "é\\'\"x" * 20)]
            with pytest.raises(BulkWriteError, match="max_allowed_packet") as info:
                router.write_many(f"INSERT INTO {name} (id, body) VALUES (%s, %s)", [(5000, "y" * 9000)], batch_size=1)
            assert info.value.failed == [0]
            assert router.stats()["nodes"][router.primary.name]["breaker_failures"] == 0  # not the node's fault
    finally:
        maria_cluster.primary.query(f"DROP TABLE IF EXISTS {name}")


MARIA_COLUMNS = "t text, bl blob, d decimal(30,6), f double, dt datetime(6), flag bool"
MARIA_ROWS = st.lists(st.tuples(
    st.none() | texts, st.none() | st.binary(max_size=40),
    st.none() | st.decimals(min_value=-(10 ** 20), max_value=10 ** 20, places=6),
    st.none() | st.floats(allow_nan=False, allow_infinity=False),
    st.none() | st.datetimes(min_value=datetime.datetime(1000, 1, 1)), st.none() | st.booleans(),
), min_size=1, max_size=60)


@pytest.fixture(scope="module")
def maria_table(maria_cluster: Any) -> Iterator[str]:
    name = "bulk_types_" + uuid.uuid4().hex[:8]
    maria_cluster.primary.query(f"CREATE TABLE {name} (k bigint primary key, {MARIA_COLUMNS}) CHARACTER SET utf8mb4")
    yield name
    maria_cluster.primary.query(f"DROP TABLE IF EXISTS {name}")
    maria_cluster.wait_replicated(timeout=60)  # the shared cluster's next test waits 10 s for its replicas


@pytest.fixture(scope="module")
def maria_router(maria_cluster: Any) -> Iterator[Router]:
    with Router(maria_cluster.primary.url, **FAST) as router:
        router.wait_for_probes(1)
        yield router


@pytest.mark.mysql
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=MARIA_ROWS)
def test_mariadb_stores_the_source_row_for_row_across_statements(maria_cluster: Any, maria_router: Router,
                                                                 maria_table: str, rows: list[tuple[Any, ...]]) -> None:
    """Values with NULLs, tabs, newlines, backslashes, quotes and non-ASCII, in batches cut into
    several INSERTs by a small max_allowed_packet: what is stored is the source."""
    maria_cluster.primary.query(f"TRUNCATE TABLE {maria_table}")
    maria_router.primary.adapter._max_packet = 3072  # type: ignore[attr-defined]  # several statements a batch
    keyed = [(k, *row) for k, row in enumerate(rows)]
    names = "k, t, bl, d, f, dt, flag"
    assert maria_router.write_many(f"INSERT INTO {maria_table} ({names}) VALUES (%s, %s, %s, %s, %s, %s, %s)", keyed,
                                   batch_size=25, workers=2) == len(rows)
    back = maria_cluster.primary.query(f"SELECT {names} FROM {maria_table} ORDER BY k")
    assert len(back) == len(keyed)
    for want, got in zip(keyed, back, strict=True):
        k, t, bl, d, f, dt, flag = got
        assert (k, t, d, f, dt) == (want[0], want[1], *want[3:6]), (want, got)
        assert (None if bl is None else bytes(bl)) == want[2]
        assert (None if flag is None else bool(flag)) == want[6]


@pytest.mark.postgres
def test_a_batch_whose_commit_broke_is_unknown_not_failed(pg_cluster: Any) -> None:
    """A deferred trigger holds one batch's COMMIT; its session is terminated meanwhile."""
    name = "bulk_commit_" + uuid.uuid4().hex[:8]
    primary = pg_cluster.primary
    primary.query(f"CREATE TABLE {name} (id bigint primary key, port int)")
    primary.query(f"CREATE FUNCTION {name}_slow() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$")
    primary.query(f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {name} DEFERRABLE INITIALLY DEFERRED "
                  f"FOR EACH ROW WHEN (NEW.id = 150) EXECUTE FUNCTION {name}_slow()")
    tag = "bulk" + uuid.uuid4().hex[:8]
    stop = threading.Event()

    def terminate_the_commit() -> None:
        while not stop.is_set():
            if primary.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = %s AND query = 'COMMIT' AND state = 'active'", (tag,)):
                return
            time.sleep(0.05)

    killer = threading.Thread(target=terminate_the_commit, daemon=True)
    killer.start()
    reports: list[BatchReport] = []
    try:
        with Router(primary.url, application_name=tag, **FAST) as router:
            with pytest.raises(BulkWriteError) as info:
                router.write_many(f"INSERT INTO {name} (id, port) VALUES (%s, %s)", ((i, 0) for i in range(400)),
                                  batch_size=100, workers=2, progress=reports.append)
            assert router.stats()["write_outcome_unknown"] == 1
        error = info.value
        assert error.unknown == [1] and error.failed == [] and error.committed == [0, 2, 3]
        assert isinstance(error.failures[1], dbrouter.WriteOutcomeUnknown)
        assert "1 unknown" in str(error)
        assert {r.index: r.status for r in reports}[1] == "unknown"
        assert primary.query(f"SELECT count(*) FROM {name} WHERE id < 100 OR id >= 200") == [(300,)]
    finally:
        stop.set()
        killer.join(10)
        primary.query(f"DROP TABLE IF EXISTS {name}")
        primary.query(f"DROP FUNCTION IF EXISTS {name}_slow()")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_failover_during_write_many_reports_every_batch_and_loses_no_commit(engine: str) -> None:
    """Kill the primary mid-load and promote a replica (synchronous replication): every batch is
    reported committed, failed or unknown; the committed ones are on the new primary exactly
    once, the failed ones not at all, an unknown one whole or not at all."""
    cluster = make_cluster("postgres" if engine == "postgres" else "mariadb", replicas=2, sync=True).start()
    try:
        cluster.primary.query("CREATE TABLE bulk_failover (id bigint primary key, port int)")
        cluster.wait_replicated()
        batch_size, batches = 500, 120
        reports: list[BatchReport] = []
        killed = threading.Event()

        def fault() -> None:
            assert wait_until(lambda: len(reports) >= 5, timeout=60)
            cluster.primary.kill()
            killed.set()
            time.sleep(0.5)
            cluster.promote(cluster.most_advanced())

        injector = threading.Thread(target=fault, daemon=True)
        with Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2, connect_timeout=2,
                    statement_timeout=5, failover_wait=20, fail_max=2, min_size=1, max_size=6) as router:
            injector.start()
            error: BulkWriteError | None = None
            try:
                router.write_many("INSERT INTO bulk_failover (id, port) VALUES (%s, %s)",
                                  ((i, 0) for i in range(batch_size * batches)), batch_size=batch_size, workers=3,
                                  progress=reports.append)
            except BulkWriteError as exc:
                error = exc
            injector.join(60)
            assert killed.is_set()
        assert sorted(r.index for r in reports) == list(range(batches))
        status = {r.index: r.status for r in reports}
        if error is not None:
            assert sorted(error.committed + error.failed + error.unknown) == list(range(batches))
            assert set(error.unknown) == {i for i, s in status.items() if s == "unknown"}
        new_primary = cluster.primary
        counts = dict(new_primary.query(f"SELECT id DIV {batch_size}, count(*) FROM bulk_failover GROUP BY 1"
                                        if engine != "postgres" else
                                        f"SELECT id / {batch_size}, count(*) FROM bulk_failover GROUP BY 1"))
        for index, state in status.items():
            stored = int(counts.get(index, 0))
            if state == "committed":
                assert stored == batch_size, (index, stored)
            elif state == "failed":
                assert stored == 0, (index, stored)
            else:
                assert stored in (0, batch_size), (index, stored)
        # Those in flight at the kill (3 workers) ran again on the new primary, or were in their COMMIT.
        assert sum(s == "committed" for s in status.values()) >= batches - 3, status
    finally:
        cluster.destroy()


# -- streams -------------------------------------------------------------------------------------

SERIES = {"postgres": "SELECT g, repeat('x', 50) FROM generate_series(1, {n}) AS g",
          "mariadb": "SELECT seq, REPEAT('x', 50) FROM seq_1_to_{n}"}


def _series(cluster: Any, n: int) -> str:
    return SERIES[cluster.engine].format(n=n)


@both_drivers
def test_stream_reads_a_replica_in_batches_and_holds_its_connection(cluster: Any, driver: str) -> None:
    events: list[dbrouter.Event] = []
    with make_router(cluster, driver, leak_threshold=0.3, maintenance_interval=0.05) as router:
        router.on("leak", events.append)
        with router.stream(f"SELECT {port_sql(cluster)}") as rows:
            assert rows.node.role == "replica"
            assert list(rows) == [(rows.node.address.port,)]
        with router.stream(_series(cluster, 2500), batch_size=1000) as rows:
            node = rows.node
            assert node.pool.stats()["in_use"] == 1
            sizes = [len(batch) for batch in rows.batches()]
            assert wait_until(lambda: any(e.name == "leak" and e.node == node.name for e in events), timeout=5)
        assert sizes == [1000, 1000, 500] and rows.rows == 2500
        assert node.pool.stats()["in_use"] == 0
        with router.stream(_series(cluster, 10), batch_size=3) as rows:
            assert [r[0] for r in rows] == list(range(1, 11))
        # Closed early: the connection goes back (PostgreSQL) or is discarded (an unread MySQL result).
        with router.stream(_series(cluster, 100_000), batch_size=100) as rows:
            node = rows.node
            assert next(iter(rows))[0] == 1
        assert node.pool.stats()["in_use"] == 0
        assert router.read("SELECT 1") == [(1,)]
        with pytest.raises(NotAReadStatement):
            router.stream("DELETE FROM nowhere")
        with pytest.raises(dbrouter.UsageError):
            list(router.stream("SELECT 1"))  # not opened: a stream is used in a with block
        stats = router.stats()
        assert all(n["pool"]["in_use"] == 0 for n in stats["nodes"].values())
        assert all(n["breaker_failures"] == 0 for n in stats["nodes"].values())


@both_drivers
def test_stream_closes_cleanly(cluster: Any, driver: str, caplog: pytest.LogCaptureFixture) -> None:
    """Closing a stream, read to its end or not, raises nothing inside (the close failed on
    psycopg2 once, and its connection went back through the error path), and the connection
    serves the next call as it is."""
    caplog.set_level("DEBUG", logger="dbrouter.stream")
    with Router(cluster.primary.url, [cluster.replicas[0].url], driver=driver, **FAST) as router:
        for n, batch_size in ((10, 3), (10, 10), (0, 5), (5000, 1000)):
            with router.stream(f"{_series(cluster, max(n, 1))} LIMIT {n}", batch_size=batch_size) as rows:
                node = rows.node
                assert [r[0] for r in rows] == list(range(1, n + 1))
            assert node.pool.stats()["in_use"] == 0
        with router.stream(_series(cluster, 5000), batch_size=100) as rows:
            assert next(iter(rows))[0] == 1
        assert router.read(f"SELECT {port_sql(cluster)}") == [(node.address.port,)]
        opened = node.pool.stats()["opened"]
        with router.stream(_series(cluster, 10), batch_size=4) as rows:
            assert rows.node is node and len(list(rows)) == 10
        with router.stream(_series(cluster, 10), batch_size=4) as rows:
            batches = list(rows.batches())
            assert [len(batch) for batch in batches] == [4, 4, 2] and all(type(b) is list for b in batches)
            assert [r[0] for b in batches for r in b] == list(range(1, 11))
        assert node.pool.stats()["opened"] == opened  # read to the end: the same connection each time
    assert [r.getMessage() for r in caplog.records if r.name == "dbrouter.stream"] == []


@both_drivers
def test_stream_takes_a_statement_as_read_does(cluster: Any, driver: str) -> None:
    """Parameters, a comment at the end, a semicolon at the end, a % without parameters."""
    with make_router(cluster, driver) as router:
        for sql, params, expected in (
            ("SELECT %s, %s", (1, "a"), [(1, "a")]),
            ("SELECT 2 -- a comment at the end", None, [(2,)]),
            ("SELECT 3;", None, [(3,)]),
            ("SELECT '100%'", None, [("100%",)]),
            (f"{_series(cluster, 5)} /* a comment */", None, [(i, "x" * 50) for i in range(1, 6)]),
        ):
            assert router.read(sql, params) == expected
            with router.stream(sql, params, batch_size=2) as rows:
                assert list(rows) == expected, sql


@pytest.mark.postgres
def test_stream_on_a_node_that_hangs_mid_stream(pg_cluster: Any, pg_driver: str) -> None:
    """A replica that stops answering between two FETCHes: the next FETCH is cut at the
    statement timeout plus its grace (the watchdog), and the stream says so."""
    replica = pg_cluster.replicas[0]
    with Router(pg_cluster.primary.url, [replica.url], driver=pg_driver, statement_timeout=0.5, **FAST) as router:
        try:
            with router.stream(_series(pg_cluster, 100_000), batch_size=1000) as rows:
                node, seen = rows.node, 0
                guard = node.guard
                assert guard is not None
                with pytest.raises(StreamInterrupted) as info:
                    for _ in rows:
                        seen += 1
                        if seen == 1500:
                            replica.freeze()
                            started = time.monotonic()
                waited = time.monotonic() - started
        finally:
            replica.thaw()
        assert info.value.rows == seen == 2000 and info.value.node == node.name
        assert guard - 0.05 <= waited < guard + 1.0, (guard, waited)


def test_stream_memory_stays_bounded(cluster: Any) -> None:
    """300,000 rows of about 60 bytes: held at once they take about 60 MiB here."""
    with make_router(cluster) as router:
        with router.stream(_series(cluster, 2000), batch_size=1000) as rows:
            sum(1 for _ in rows)  # warm: imports, buffers, the cursor's first batch
        before = peak = _rss()
        count = 0
        with router.stream(_series(cluster, 300_000), batch_size=2000) as rows:
            for batch in rows.batches():
                count += len(batch)
                peak = max(peak, _rss())
        assert count == 300_000
        assert peak - before < 12 * 2 ** 20, (peak - before) / 2 ** 20


@both_drivers
def test_stream_says_so_when_its_node_goes_away_mid_stream(cluster: Any, driver: str) -> None:
    with make_router(cluster, driver, fail_max=1) as router:
        with router.stream(_series(cluster, 400_000), batch_size=1000) as rows:
            node = rows.node
            conn = rows._lease.conn  # type: ignore[union-attr]
            if cluster.engine != "postgres":
                session = conn.connection_id
            else:
                session = conn.info.backend_pid if driver == "psycopg" else conn.get_backend_pid()
            seen = []
            with pytest.raises(StreamInterrupted) as info:
                for row in rows:
                    seen.append(row[0])
                    if len(seen) == 1000:
                        server = next(n for n in cluster.nodes if n.port == node.address.port)
                        if cluster.engine == "postgres":
                            server.query("SELECT pg_terminate_backend(%s)", (session,))
                        else:
                            server.query(f"KILL {session}")
        error = info.value
        assert error.node == node.name and error.rows == len(seen) < 400_000
        assert seen == list(range(1, len(seen) + 1))  # a prefix, nothing twice
        assert f"after {len(seen)} rows" in str(error) and error.__cause__ is not None
        assert node.pool.stats()["in_use"] == 0
        assert router.read("SELECT 1") == [(1,)]
