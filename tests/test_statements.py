"""The read rule (`dbrouter.statements`), without a server: what `Router.read` refuses and why.

Issue 13 item 3: ``read("SELECT 1; DELETE FROM t")`` deleted every row, and
``is_read_statement`` called EXPLAIN ANALYZE DELETE, locking SELECTs, data-modifying
CTEs and multi-statement texts reads. The real-server side is in test_router.py and
test_resilience.py.
"""

from __future__ import annotations

import pytest

from dbrouter import is_read_statement
from dbrouter.statements import QUOTED_PLACEHOLDER, UNSEEN, Verdicts, read_problem

BOTH = ("postgres", "mysql")

READS = [
    "SELECT 1",
    "select 1;",
    "  -- a comment\n SELECT 1 ; ; ",
    "/* a ; DELETE in a comment */ SELECT 1",
    "SELECT 'a;b', 'DELETE FROM t' FROM t",
    "SELECT 'it''s; fine'",
    "SELECT \"a;delete\" FROM t",
    "SELECT 1 AS \"update\"",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) SELECT i FROM n",
    "(SELECT 1) UNION (SELECT 2)",
    "VALUES (1), (2)",
    "TABLE t",
    "SHOW search_path",
    "DESCRIBE t",
    "DESC t",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN DELETE FROM t",  # planned, not run
    "EXPLAIN ANALYZE SELECT * FROM t",
    "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
    "EXPLAIN FORMAT=JSON SELECT 1",
    "SELECT my_report(%s)",  # a function of your own is not looked into
    "SELECT replace(name, 'a', 'b') FROM t",
    "SELECT * FROM pg_locks",
    "SELECT * FROM t WHERE name LIKE 'a%%s'",  # an escaped percent, not a placeholder
    "SELECT 1 /*+ a hint */",
]

REFUSED = [
    ("SELECT 1; DELETE FROM t", "2 statements"),
    ("SELECT 1; SELECT 2", "2 statements"),
    ("", "empty"),
    (";", "empty"),
    ("INSERT INTO t VALUES (1) RETURNING id", "starts with INSERT"),
    ("UPDATE t SET a = 1", "starts with UPDATE"),
    ("DELETE FROM t", "starts with DELETE"),
    ("CALL report()", "starts with CALL"),
    ("ANALYZE SELECT 1", "starts with ANALYZE"),
    ("EXPLAIN ANALYZE DELETE FROM t", "EXPLAIN ANALYZE runs"),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", "EXPLAIN ANALYZE runs"),
    ("EXPLAIN (ANALYZE) CREATE TABLE x AS SELECT 1", "starts with CREATE"),
    ("SELECT * FROM t FOR UPDATE", "locking clause"),
    ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", "locking clause"),
    ("SELECT * FROM t FOR SHARE", "locking clause"),
    ("SELECT * FROM t FOR KEY SHARE", "locking clause"),
    ("SELECT * FROM t LOCK IN SHARE MODE", "locking clause"),
    ("SELECT * INTO copy FROM t", "INTO"),
    ("SELECT a FROM t INTO @x", "INTO"),
    ("SELECT a FROM t INTO OUTFILE '/tmp/x'", "INTO"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE"),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", "INSERT"),
    ("WITH x AS (SELECT 1) UPDATE t SET a = 1", "UPDATE"),
    ("SELECT nextval('s')", "nextval()"),
    ("SELECT pg_catalog.setval('s', 1)", "setval()"),
    ("SELECT NEXT VALUE FOR s", "NEXT VALUE FOR"),
    ("SELECT pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("SELECT pg_try_advisory_lock(1)", "pg_try_advisory_lock()"),
    ("SELECT GET_LOCK('a', 1)", "get_lock()"),
    ("SELECT set_config('search_path', 'x', false)", "set_config()"),
    ("SELECT pg_promote()", "pg_promote()"),
    ("SELECT 'open", "unterminated"),
    ("SELECT 1 /* open", "unterminated comment"),
    ("SELECT update FROM t", "UPDATE"),  # PostgreSQL allows it unquoted: the escape hatch's case
]


@pytest.mark.parametrize("engine", BOTH)
@pytest.mark.parametrize("sql", READS)
def test_reads_pass(sql: str, engine: str) -> None:
    assert read_problem(sql, engine) is None
    assert is_read_statement(sql, engine) and is_read_statement(sql)


@pytest.mark.parametrize("engine", BOTH)
@pytest.mark.parametrize(("sql", "reason"), REFUSED)
def test_what_is_not_one_read_is_refused_with_the_reason(sql: str, reason: str, engine: str) -> None:
    problem = read_problem(sql, engine)
    assert problem is not None and reason in problem, problem
    assert not is_read_statement(sql, engine) and not is_read_statement(sql)


# Lexing that differs by engine: the statement passes on one and is refused on the other.
BY_ENGINE = [
    # (sql, a read on PostgreSQL, a read on MySQL/MariaDB)
    ("SELECT $$;DELETE FROM t$$", True, False),  # dollar quotes are PostgreSQL's
    ("SELECT $tag$ ; $ $tag$", True, False),
    ("SELECT $a$ open", False, True),
    ("SELECT E'a\\'; DELETE FROM t; --'", True, False),  # an escape string
    ("SELECT `a;b` FROM t", False, True),  # backquotes are MySQL's
    ("SELECT 1 # a comment; DELETE FROM t\n", False, True),  # so is #
    ("SELECT 1 --1; DELETE FROM t", True, False),  # MySQL: "--" needs a space to start a comment
    ("SELECT /*! 1; DELETE FROM t */", True, False),  # MySQL runs the inside of /*! */
    ("SELECT /*M!100000 1; DELETE FROM t */", True, False),
    ("/* outer /* nested */ ; DELETE FROM t */ SELECT 1", True, False),  # PostgreSQL nests comments
]


@pytest.mark.parametrize(("sql", "postgres", "mysql"), BY_ENGINE)
def test_lexing_follows_the_engine(sql: str, postgres: bool, mysql: bool) -> None:
    assert (read_problem(sql, "postgres") is None) is postgres
    assert (read_problem(sql, "mysql") is None) is mysql
    assert not is_read_statement(sql)  # without an engine: a read on both or refused


@pytest.mark.parametrize("engine", BOTH)
def test_a_backslash_is_read_both_ways(engine: str) -> None:
    """standard_conforming_strings=off (PostgreSQL) or the default backslash escapes (MySQL)
    make ``'a\\', '`` one string and the DELETE a second statement: refused on both."""
    assert read_problem("SELECT 'a\\', '; DELETE FROM t; -- '", engine) is not None
    assert read_problem("SELECT 'a\\', '; DELETE FROM t; -- '", "postgres") == "it is 2 statements (a ';' outside quotes and comments), not one"
    assert read_problem("SELECT 'C:\\\\dir'", engine) is None


@pytest.mark.parametrize("engine", BOTH)
@pytest.mark.parametrize("sql", ["SELECT * FROM t WHERE name = '%s'", "SELECT %s -- 100%s", "SELECT '%(name)s'"])
def test_a_placeholder_in_quotes_is_flagged(sql: str, engine: str) -> None:
    """The driver would put a quoted value there, ending the literal: refused when
    parameters are passed (Router.read), fine without (nothing is substituted)."""
    assert read_problem(sql, engine) is QUOTED_PLACEHOLDER
    assert is_read_statement(sql, engine)


def test_verdicts_are_remembered_and_bounded() -> None:
    verdicts = Verdicts("postgres")
    assert verdicts.get("SELECT 1", UNSEEN) is UNSEEN
    assert verdicts.judge("SELECT 1") is None and verdicts.get("SELECT 1", UNSEEN) is None
    assert verdicts.problem("DELETE FROM t") == verdicts["DELETE FROM t"] is not None
    long = "SELECT 1" + " " * 5000
    assert verdicts.problem(long) is None and long not in verdicts  # judged, not kept alive
    for i in range(3000):
        verdicts.problem(f"SELECT {i}")
    assert len(verdicts) <= 1024
