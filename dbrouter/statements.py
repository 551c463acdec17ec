"""What a statement is, from its text: may `Router.read` run it on a replica, and run it again?

`read_problem` answers with the reason a statement is not a single read, or None.
The rule, applied to the text with comments removed and string literals, quoted
identifiers (``"..."``, backquotes) and dollar-quoted strings skipped (a ``;`` or a
keyword inside them counts for nothing):

1. One statement: no ``;`` except trailing ones.
2. It starts (after any opening parentheses) with SELECT, WITH, VALUES, TABLE, SHOW,
   EXPLAIN, DESCRIBE or DESC.
3. EXPLAIN / DESCRIBE / DESC only plans, so any statement may follow; with ANALYZE
   (or ANALYSE) it runs the statement, which must then pass this rule itself.
4. Anywhere else, none of these words: INSERT, UPDATE, DELETE, MERGE (a
   data-modifying CTE, FOR UPDATE, FOR NO KEY UPDATE), INTO (SELECT ... INTO a
   table, a file or variables); no FOR SHARE, FOR KEY SHARE, LOCK IN SHARE MODE;
   no NEXT VALUE FOR; no call of a function that changes state: those in
   `STATE_FUNCTIONS` or starting with one of `STATE_FUNCTION_PREFIXES`
   (sequences, advisory and named locks, session settings, notifications,
   server control, large objects). Functions of your own are not looked into.

Lexing follows the engine: PostgreSQL nests ``/* */`` comments and has ``E'...'``
and ``$tag$...$tag$`` strings; MySQL/MariaDB have ``#`` comments, ``--`` comments
only when a space follows, backslash escapes, and run the inside of ``/*! */`` and
``/*M! */`` comments (so it is read as code). A backslash in a string is read both
as an escape and as a plain character (the server's ``standard_conforming_strings``
or ``NO_BACKSLASH_ESCAPES`` decides which), and the statement must pass either way.
An unterminated string, identifier or comment does not pass.

Separately, `QUOTED_PLACEHOLDER` flags a statement that passes but has a ``%s`` or
``%(name)s`` inside quotes or a comment: the driver puts the quoted value of a
parameter there, which can end the literal and start a second statement.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "QUOTED_PLACEHOLDER",
    "READ_KEYWORDS",
    "STATE_FUNCTIONS",
    "STATE_FUNCTION_PREFIXES",
    "UNSEEN",
    "Verdicts",
    "is_read_statement",
    "read_problem",
    "verdicts",
]

READ_KEYWORDS: Final = ("select", "with", "values", "table", "show", "explain", "describe", "desc")
"""The first keywords of a read (rule 2)."""

STATE_FUNCTIONS: Final = frozenset({
    # sequences (MariaDB too)
    "nextval", "setval",
    # session state that outlives the statement on a pooled connection
    "set_config", "get_lock", "release_lock", "release_all_locks",
    # notifications and server control
    "pg_notify", "pg_promote", "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf",
    "pg_rotate_logfile", "pg_switch_wal", "pg_wal_replay_pause", "pg_wal_replay_resume",
    "pg_logical_emit_message", "pg_replication_slot_advance",
    # large objects
    "lo_import", "lo_export", "lo_unlink", "lo_create", "lo_creat", "lo_from_bytea", "lo_put",
    "lo_truncate", "lo_truncate64",
})
"""Functions that change the database, the server or the session (rule 4)."""

STATE_FUNCTION_PREFIXES: Final = (
    "pg_advisory_", "pg_try_advisory_", "pg_create_", "pg_drop_", "pg_stat_reset",
    "pg_replication_origin_", "pg_logical_slot_get_",
)
"""Name prefixes of more such functions (advisory locks, slots, restore points, statistics resets)."""

QUOTED_PLACEHOLDER: Final = (
    "it has a %s or %(name)s placeholder inside quotes or a comment, where the driver would "
    "put a quoted value that can end the literal"
)
"""`read_problem`'s answer for a read whose only problem is a placeholder in quotes:
a problem only when parameters are passed (the driver substitutes them)."""

_POSTGRES = "postgres"
_MYSQL = "mysql"
_CACHE_SIZE = 1024  # distinct statements whose verdict is remembered, per engine
_CACHE_MAX_LEN = 4096  # longer statements are judged every time rather than kept alive by the cache

_WRITE_WORDS = frozenset({"insert", "update", "delete", "merge"})
_EXPLAIN_OPTIONS = frozenset({
    "analyze", "analyse", "verbose", "extended", "partitions", "format", "json", "tree", "traditional",
    "xml", "yaml", "text",
})
_LOCKING = "it has a locking clause (FOR UPDATE, FOR SHARE, LOCK IN SHARE MODE), which takes row locks"
_PLACEHOLDER = re.compile(r"(?<!%)(?:%%)*%[s(]")

# Tokens the rule looks at: words (lowercased), ";", "(", ")", and "'" for anything quoted.
# Everything else (numbers, operators, commas, whitespace) is skipped: in runs by _SKIP (a
# long IN list of numbers costs one match), one character at a time by "other".
_SKIP = r"[0-9\s,.+*=<>!%&|^~@:?\[\]{}\\]*"
_WORD = r"(?P<word>[^\W\d][\w$]*)"
_POSTGRES_TOKENS = (
    r"(?P<line>--[^\n]*)"
    r"|(?P<block>/\*)"
    r"|(?P<estr>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*')"
    r"|(?P<str>'(?:[^']|'')*')"
    r"|(?P<ident>\"(?:[^\"]|\"\")*\")"
    r"|(?P<dollar>(?<![\w$])\$(?:[^\W\d][\w]*)?\$)"
    r"|" + _WORD +
    r"|(?P<punct>[;()])"
    r"|(?P<open>['\"])"
    r"|(?P<other>.)"
)
_MYSQL_TOKENS = (
    r"(?P<line>(?:\#|--(?=[\x00-\x20]|\Z))[^\n]*)"
    r"|(?P<code>/\*M?!\d*)"
    r"|(?P<comment>/\*.*?\*/)"
    r"|(?P<str>'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\")"
    r"|(?P<ident>`(?:[^`]|``)*`)"
    r"|" + _WORD +
    r"|(?P<punct>[;()])"
    r"|(?P<open>['\"`]|/\*)"
    r"|(?P<other>.)"
)
_LEXERS = {
    # (engine, backslash escapes in plain strings): the token pattern, after a skipped run
    (_POSTGRES, False): re.compile(f"{_SKIP}(?:{_POSTGRES_TOKENS})", re.S),
    (_POSTGRES, True): re.compile(f"{_SKIP}(?:{_POSTGRES_TOKENS})".replace(
        r"(?P<str>'(?:[^']|'')*')", r"(?P<str>'(?:[^'\\]|\\.|'')*')"), re.S),
    (_MYSQL, True): re.compile(f"{_SKIP}(?:{_MYSQL_TOKENS})", re.S),
    (_MYSQL, False): re.compile(f"{_SKIP}(?:{_MYSQL_TOKENS})".replace(
        r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"", r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""), re.S),
}
_NESTED_COMMENT = re.compile(r"/\*|\*/")


class _Unterminated(Exception):
    pass


def _tokens(sql: str, engine: str, backslashes: bool) -> tuple[list[str], bool]:
    """The tokens of ``sql`` and whether a placeholder sits inside quotes or a comment.

    Raises `_Unterminated` naming what was left open.
    """
    pattern = _LEXERS[engine, backslashes]
    tokens: list[str] = []
    quoted_placeholder = False
    pos = 0
    end = len(sql)
    while pos < end:
        match = pattern.match(sql, pos)
        if match is None:
            break  # only skipped characters were left
        kind = match.lastgroup
        pos = match.end()
        if kind == "other":
            continue
        token = match.group(kind)  # type: ignore[arg-type]
        if kind == "word":
            tokens.append(token.lower())
            continue
        if kind == "punct":
            tokens.append(token)
            continue
        if kind == "code":
            continue  # MySQL runs the inside of /*! */: read on as code (the */ is skipped)
        if kind == "open":
            what = "comment" if token == "/*" else "quoted string or identifier"
            raise _Unterminated(f"it has an unterminated {what}")
        if kind == "block":  # PostgreSQL: comments nest
            start = pos - 2
            depth = 1
            while depth:
                mark = _NESTED_COMMENT.search(sql, pos)
                if mark is None:
                    raise _Unterminated("it has an unterminated comment")
                depth += 1 if mark.group() == "/*" else -1
                pos = mark.end()
            text = sql[start:pos]
        elif kind == "dollar":
            tag = token
            close = sql.find(tag, pos)
            if close < 0:
                raise _Unterminated("it has an unterminated dollar-quoted string")
            text = sql[pos:close]
            pos = close + len(tag)
            tokens.append("'")
        else:  # a string, a quoted identifier or a comment
            text = token
            if kind in ("str", "estr", "ident"):
                tokens.append("'")
        if not quoted_placeholder and "%" in text and _PLACEHOLDER.search(text):
            quoted_placeholder = True
    return tokens, quoted_placeholder


def _judge(tokens: list[str]) -> str | None:
    """Rules 1 to 4 over the tokens of a whole text."""
    statements: list[list[str]] = [[]]
    for token in tokens:
        if token == ";":
            statements.append([])
        else:
            statements[-1].append(token)
    found = [s for s in statements if s]
    if not found:
        return "it is empty"
    if len(found) > 1:
        return f"it is {len(found)} statements (a ';' outside quotes and comments), not one"
    return _judge_one(found[0])


def _judge_one(tokens: list[str]) -> str | None:
    start = 0
    while start < len(tokens) and tokens[start] == "(":
        start += 1
    first = tokens[start] if start < len(tokens) else ""
    if first not in READ_KEYWORDS:
        shown = "a quoted name" if first == "'" else (first.upper() or "nothing")
        return f"it starts with {shown}, not SELECT, WITH, VALUES, TABLE, SHOW, EXPLAIN or DESCRIBE"
    if first in ("explain", "describe", "desc"):
        return _judge_explain(tokens[start + 1:])
    return _judge_body(tokens, start + 1)


def _judge_explain(rest: list[str]) -> str | None:
    """Rule 3: the options of EXPLAIN, then the statement it explains."""
    analyze = False
    at = 0
    if rest and rest[0] == "(":  # PostgreSQL: EXPLAIN (ANALYZE, FORMAT JSON) ...
        depth = 0
        for at, token in enumerate(rest):  # noqa: B007 - at is used after the loop
            if token == "(":
                depth += 1
            elif token == ")":
                depth -= 1
            elif token in ("analyze", "analyse"):
                analyze = True
            if depth == 0:
                break
        at += 1
    while at < len(rest) and rest[at] in _EXPLAIN_OPTIONS:
        analyze = analyze or rest[at] in ("analyze", "analyse")
        at += 1
    if not analyze:
        return None  # planned, not run
    problem = _judge_one(rest[at:])
    return None if problem is None else f"EXPLAIN ANALYZE runs the statement it explains, and {problem}"


def _judge_body(tokens: list[str], start: int) -> str | None:
    """Rule 4 over one statement that starts like a read."""
    previous = ""
    for index in range(start, len(tokens)):
        token = tokens[index]
        if token in _WRITE_WORDS:
            if token == "update" and previous in ("for", "key"):
                return _LOCKING
            return f"it contains {token.upper()} (a data-modifying statement or CTE)"
        if token == "share" and previous in ("for", "key", "in"):
            return _LOCKING
        if token == "into":
            return "it has INTO (SELECT ... INTO writes a table, a file or variables)"
        if token == "next" and tokens[index + 1:index + 3] == ["value", "for"]:
            return "it has NEXT VALUE FOR, which advances a sequence"
        if ((token in STATE_FUNCTIONS or token.startswith(STATE_FUNCTION_PREFIXES))
                and tokens[index + 1:index + 2] == ["("]):
            return f"it calls {token}(), which changes the database, the server or the session"
        previous = token
    return None


def read_problem(sql: str, engine: str | None = None) -> str | None:
    """Why ``sql`` is not a single read statement by the module's rule, or None when it is.

    ``engine`` is ``"postgres"`` or ``"mysql"``; None applies both engines' lexing.
    Returns `QUOTED_PLACEHOLDER` for a read whose only problem is a placeholder inside
    quotes or a comment.
    """
    quoted_placeholder = False
    for name in (_POSTGRES, _MYSQL) if engine is None else (engine,):
        backslash_default = name == _MYSQL
        readings = (backslash_default, not backslash_default) if "\\" in sql else (backslash_default,)
        for backslashes in readings:
            try:
                tokens, placeholder = _tokens(sql, name, backslashes)
            except _Unterminated as open_:
                return str(open_)
            problem = _judge(tokens)
            if problem is not None:
                return problem
            quoted_placeholder = quoted_placeholder or placeholder
    return QUOTED_PLACEHOLDER if quoted_placeholder else None


UNSEEN: Final = "(not judged yet)"
"""What `Verdicts.get` is given as the default: ``verdicts.get(sql, UNSEEN) is UNSEEN``."""


class Verdicts(dict[str, "str | None"]):
    """`read_problem` verdicts for one engine, by statement text.

    The read hot path is one ``dict.get``; `judge` fills it in. It keeps statements
    up to 4096 characters long (longer ones are judged every time rather than kept
    alive) and starts afresh after 1024 distinct ones. Shared by every router of
    the engine; dict operations are atomic, so no lock is needed.
    """

    def __init__(self, engine: str) -> None:
        super().__init__()
        self.engine = engine

    def judge(self, sql: str) -> str | None:
        problem = read_problem(sql, self.engine)
        if len(sql) <= _CACHE_MAX_LEN:
            if len(self) >= _CACHE_SIZE:
                self.clear()
            self[sql] = problem
        return problem

    def problem(self, sql: str) -> str | None:
        """`read_problem` of ``sql``, remembered."""
        problem = self.get(sql, UNSEEN)
        return self.judge(sql) if problem is UNSEEN else problem


_VERDICTS = {_POSTGRES: Verdicts(_POSTGRES), _MYSQL: Verdicts(_MYSQL)}


def verdicts(engine: str) -> Verdicts:
    """The shared `Verdicts` of ``engine`` (``"postgres"`` or ``"mysql"``)."""
    return _VERDICTS[engine]


def is_read_statement(sql: str, engine: str | None = None) -> bool:
    """True for a single read statement by this module's rule, which `Router.read` and
    `Session.read` require (``engine`` as for `read_problem`). `Session.execute` and the
    SQLAlchemy integration send what is not one to the primary."""
    problem = read_problem(sql) if engine is None else _VERDICTS[engine].problem(sql)
    return problem is None or problem is QUOTED_PLACEHOLDER
