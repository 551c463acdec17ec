"""``COPY ... FROM STDIN`` for plain INSERTs: the statement's shape, the table's columns, and
the text format, value by value, for the types the PostgreSQL drivers adapt.

`Router.write_many` sends a plain ``INSERT INTO t (cols) VALUES (%s, ...)`` as COPY when it
can prove that COPY stores what the INSERT would have stored. psycopg2 sends a value as a
literal whose text is, for every type below, the text written here (``isoformat()`` for dates
and times, ``repr`` for floats, ``str`` for numbers and UUIDs, ``\\x`` + hex for bytea), and
the server parses it with the column's input function, as COPY does. Where psycopg2 casts
the literal (``'...'::timestamptz``, ``ARRAY[...]``) and the server then converts it to a
column of another type, the two could differ (an aware datetime into a ``timestamp`` column
is converted to the session's time zone by the INSERT, truncated by COPY's parser). So each
column accepts, besides NULL and ``str`` (an untyped literal in the INSERT, parsed by the
column's input function exactly as COPY parses it), only the Python types whose text the
column's own type parses to the same value; a batch holding any other value (a float for an
integer column, a ``dict``, a subclass, a user type) is sent as the INSERT instead. The
server's answer is then the INSERT's, error included.

psycopg 3 binds the values server-side instead, each with a type (``str`` untyped, ``int`` as
the smallest integer type that holds it, ``float`` as float8, ``datetime`` as timestamp or
timestamptz, ``list`` as an array of its items' type), and the server converts each to the
column's type with an assignment cast. Where that cast stores something else than the column's
input function would from psycopg2's text, the driver's `CopyRules` say so: a float for a
numeric column is converted by ``float8_numeric``, which keeps 15 significant digits
(``%.15g``: 0.1 + 0.2 is stored as 0.3), and for a float4 column by a C cast from the double,
rounded once (the text of the double, parsed by ``float4in``, can round the other way when the
double lies on a midpoint between two floats); its ``Json`` goes only into json, jsonb and
text-like columns (a json value has no cast to the other types) and its ``Jsonb`` only into
jsonb (jsonb's cast to json or text gives jsonb's normalised text, not the text sent). Lists
follow each driver's rules too (see `CopyRules`).

psycopg 3's own ``Copy.write_row`` is not used: it writes each value's text by psycopg's dumper,
which is not always what psycopg 3's INSERT stores (a float for a numeric column keeps all its
digits, an aware datetime for a timestamp column loses its offset), and it offers no way back to
the INSERT; the checks above would still have to run first. For 200,000 rows of (bigint, text,
float8) it took about 0.6 us of client CPU per row, `encode_batch` about 0.8 us checks included.

Text format, not binary. Binary COPY is parsed by the types' receive functions, not by the
input functions the INSERT's literals go through, and needs every value packed for the exact
column type (int4 or int8, numeric's base-10000 digits, microseconds since 2000, array
headers). Measured on this 2-core machine (busy, so CPU time) for 200,000 rows of (bigint,
text, float8): the text here costs about 1.0 us of client CPU per row, a binary encoder written
for exactly that row shape (one ``struct.pack`` per row) about 0.55 us, and the server took
about as long to load either. A general binary encoder pays a Python call per value, as the
text one does for its mixed columns, and more for numerics and timestamps; the text one hands
the common columns to C code whole (`encode_batch`).
"""

from __future__ import annotations

import datetime
import decimal
import re
import uuid
from operator import itemgetter
from typing import Any, Callable, Mapping, Sequence

__all__ = ["CATALOG_SQL", "CopyPlan", "CopyRules", "copy_target", "encode_batch", "make_plan"]

Encoder = Callable[[Any], str]


class NotNative(Exception):
    """A value COPY would not store as the INSERT does: the batch goes as the INSERT."""


# -- the statement ----------------------------------------------------------------------

_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_TARGET = re.compile(
    rf"(?s)^\s*INSERT\s+INTO\s+(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)"
    rf"\s*(?:\(\s*(?P<columns>{_IDENT}(?:\s*,\s*{_IDENT})*)\s*\))?"
    r"\s*VALUES\s*\((?P<values>(?:\s*%s\s*,)*\s*%s\s*)\)\s*;?\s*$",
)
_IDENT_ONE = re.compile(_IDENT)


def _name(ident: str) -> str:
    """An identifier as the catalog spells it: quoted ones verbatim, the others lower-cased."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def copy_target(sql: str) -> tuple[str, list[str] | None, int] | None:
    """``(table, column names or None, placeholders)`` for a plain ``INSERT INTO t [(cols)]
    VALUES (%s, ...)``; None for anything else (``ON CONFLICT``, ``RETURNING``, expressions,
    ``DEFAULT``, a CTE, an alias, ``OVERRIDING``, ...), which stays an INSERT."""
    match = _TARGET.match(sql)
    if match is None:
        return None
    columns = match.group("columns")
    names = [_name(m.group(0)) for m in _IDENT_ONE.finditer(columns)] if columns else None
    width = match.group("values").count("%s")
    if names is not None and len(names) != width:
        return None  # the INSERT's own error, not COPY's
    return match.group("table"), names, width


# Each column's base type (domains resolved), its category, and for arrays the element's base
# type; with the relation's kind, row security and INSERT rules (which COPY does not apply).
CATALOG_SQL = """
SELECT c.relkind::text, c.relrowsecurity,
       EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type = '3'),
       a.attname::text, a.attgenerated::text, bt.typname::text, bt.typcategory::text,
       coalesce(et.typname::text, ''), coalesce(et.typcategory::text, '')
FROM pg_class c
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_type et0 ON et0.oid = bt.typelem AND bt.typcategory = 'A'
LEFT JOIN pg_type et ON et.oid = CASE WHEN et0.typtype = 'd' THEN et0.typbasetype ELSE et0.oid END
WHERE c.oid = to_regclass(%s)
ORDER BY a.attnum
"""


class CopyPlan:
    """How a statement's batches are copied: the COPY statement and one encoder table per column."""

    __slots__ = ("statement", "columns", "width")

    def __init__(self, statement: str, columns: list[Mapping[type, Encoder]]) -> None:
        self.statement = statement
        self.columns = columns
        self.width = len(columns)

    def __repr__(self) -> str:
        return f"<CopyPlan {self.statement!r}>"


def make_plan(sql: str, catalog: Sequence[Sequence[Any]], rules: CopyRules) -> CopyPlan | None:
    """The plan for ``sql`` from the rows of `CATALOG_SQL` and the driver's ``rules``, or None when COPY cannot stand in
    for the INSERT (a view, row security, an INSERT rule, an unknown column, a generated column
    the INSERT would have to skip)."""
    target = copy_target(sql)
    if target is None or not catalog:
        return None
    table, names, width = target
    relkind, row_security, has_rules = catalog[0][0], catalog[0][1], catalog[0][2]
    if relkind not in ("r", "p") or row_security or has_rules:
        return None
    by_name = {row[3]: row for row in catalog}
    if names is None:
        # INSERT INTO t VALUES (...) fills the first columns in order (the rest get defaults);
        # COPY without a list skips generated columns, so name the columns it should fill.
        chosen = list(catalog[:width])
        if len(chosen) != width or any(row[4] for row in chosen):
            return None
        statement = f"COPY {table} ({', '.join(_quote(row[3]) for row in chosen)}) FROM STDIN"
    else:
        if len(set(names)) != len(names) or any(name not in by_name for name in names):
            return None
        chosen = [by_name[name] for name in names]
        statement = f"COPY {table} ({', '.join(_quote(name) for name in names)}) FROM STDIN"
    return CopyPlan(statement, [rules.column(row[5], row[6], row[7], row[8]) for row in chosen])


# -- values -------------------------------------------------------------------------------

_SPECIAL = re.compile(r"[\\\t\n\r]")


def _text(value: str) -> str:
    """A text field: backslash, tab, newline and carriage return escaped (COPY's text format)."""
    if _SPECIAL.search(value) is None:
        return value
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _null(_value: Any) -> str:
    return "\\N"


def _decimal(value: decimal.Decimal) -> str:
    if value.is_finite():
        return str(value)
    if value.is_nan():
        return "NaN"
    return "-Infinity" if value.is_signed() else "Infinity"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _bytea(value: bytes | bytearray | memoryview) -> str:
    return "\\\\x" + bytes(value).hex()  # \x... with its backslash escaped for COPY


def _naive_datetime(value: datetime.datetime) -> str:
    if value.tzinfo is not None:
        raise NotNative("an aware datetime for a timestamp column")  # the INSERT converts it
    return value.isoformat()


def _naive_time(value: datetime.time) -> str:
    if value.tzinfo is not None:
        raise NotNative("an aware time for a time column")
    return value.isoformat()


def _aware_time(value: datetime.time) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise NotNative("a naive time for a timetz column")
    return value.isoformat()


def _interval(value: datetime.timedelta) -> str:
    return f"{value.days} days {value.seconds}.{value.microseconds:06d} seconds"  # psycopg2's text


def _isoformat(value: datetime.date | datetime.datetime) -> str:
    return value.isoformat()


_ALWAYS: dict[type, Encoder] = {type(None): _null, str: _text}
_INTEGER: dict[type, Encoder] = {int: int.__repr__}
# repr: the shortest text that reads back as the same double; 'inf', '-inf' and 'nan' are read
# by float4, float8 and numeric (PostgreSQL 14+) alike.
_FLOATS: dict[type, Encoder] = {int: int.__repr__, float: float.__repr__, decimal.Decimal: _decimal}

# Base type name -> the Python types (besides None, str and Json) stored alike by COPY and INSERT.
_BY_TYPE: dict[str, dict[type, Encoder]] = {
    "int2": _INTEGER, "int4": _INTEGER, "int8": _INTEGER,
    "numeric": _FLOATS, "float4": _FLOATS, "float8": _FLOATS,
    "bool": {bool: _bool},
    "bytea": {bytes: _bytea, bytearray: _bytea, memoryview: _bytea},
    "date": {datetime.date: _isoformat},
    "timestamp": {datetime.date: _isoformat, datetime.datetime: _naive_datetime},
    "timestamptz": {datetime.date: _isoformat, datetime.datetime: _isoformat},
    "time": {datetime.time: _naive_time},
    "timetz": {datetime.time: _aware_time},
    "interval": {datetime.timedelta: _interval},
    "uuid": {uuid.UUID: str},
}
# Text-like columns (category S: text, varchar, char, name, citext): an int or a bool reaches
# them through the cast to text, whose output is this text.
_STRING: dict[type, Encoder] = {int: int.__repr__, bool: _bool}


def _array_item(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _array(element: Mapping[type, Encoder]) -> Encoder:
    """A list as an array literal ('{"a",NULL,{"b"}}'), each element checked against the
    element type as a column value is; then escaped for COPY as a whole. A list whose items
    (at any depth, NULLs aside) are not all of one type is refused (see `CopyRules`)."""

    def literal(value: list[Any], kinds: set[type]) -> str:
        parts = []
        for item in value:
            if item is None:
                parts.append("NULL")
            elif type(item) is list:
                parts.append(literal(item, kinds))
            else:
                kinds.add(type(item))
                parts.append(_array_item(element[type(item)](item)))
        return "{" + ",".join(parts) + "}"

    def encode(value: list[Any]) -> str:
        kinds: set[type] = set()
        text = literal(value, kinds)
        if len(kinds) > 1:
            raise NotNative("a list of items of several types")
        return _text(text)

    return encode


class CopyRules:
    """How one driver sends Python values in an INSERT, as far as COPY's text must follow it.

    ``json``: the driver's JSON wrappers, each with the function giving its JSON text and the
    base types of the columns it may go into (None: every column; ``"S"``: the text-like
    ones). ``floats``: base type name -> the text of a float for that column type, where the
    driver's INSERT does not store what ``repr`` parses to. Lists: a list whose items (NULLs
    aside, at any depth) are of several types is never copied: psycopg 3 refuses it, and
    psycopg2's ``ARRAY[...]`` gives its items one type by the server's rules (``ARRAY[1,
    'a']`` fails, ``ARRAY['a', true]`` is boolean). ``text_array_strings``: a ``str`` item
    (or a JSON wrapper allowed in every column, so sent as a string literal) goes only into an
    array of a text-like type (psycopg2's ``ARRAY['1', NULL]`` is a text[], which no assignment
    cast turns into a bigint[] or a jsonb[]; psycopg 3 sends a list of strings as an untyped
    literal, which the column's array type parses, as COPY does).
    """

    def __init__(self, *, json: Mapping[type, tuple[Callable[[Any], str], frozenset[str] | None]],
                 floats: Mapping[str, Encoder] | None = None, text_array_strings: bool = False) -> None:
        # Each JSON wrapper's column encoder escapes its text for COPY; as an array element, the
        # text goes unescaped into the array literal, which is escaped once as a whole.
        self._raw: dict[Encoder, Encoder] = dict(_RAW)
        self._json: dict[type, tuple[Encoder, frozenset[str] | None]] = {}
        for kind, (raw, where) in json.items():
            encoder = _escaped(raw)
            self._raw[encoder] = raw
            self._json[kind] = (encoder, where)
        self._by_type = dict(_BY_TYPE)
        for typname, encoder in (floats or {}).items():
            self._by_type[typname] = {**_BY_TYPE[typname], float: encoder}
        self._text_array_strings = text_array_strings

    def scalar(self, typname: str, category: str) -> dict[type, Encoder]:
        """The encoders of a column of base type ``typname`` (``category``: its typcategory)."""
        table = dict(_ALWAYS)
        table.update(self._by_type.get(typname, _STRING if category == "S" else {}))
        for kind, (encoder, where) in self._json.items():
            if where is None or typname in where or (category == "S" and "S" in where):
                table[kind] = encoder
        return table

    def column(self, typname: str, category: str, element: str, element_category: str) -> dict[type, Encoder]:
        """The encoders of a column, arrays included (the `CATALOG_SQL` row's last four fields)."""
        if category == "A" and element:
            items = self._unescaped(self.scalar(element, element_category))
            if self._text_array_strings and element_category != "S":
                # The untyped strings: str, and a JSON wrapper allowed everywhere (psycopg2's Json).
                for kind in [str, *(kind for kind, (_, where) in self._json.items() if where is None)]:
                    del items[kind]
            return {type(None): _null, str: _text, list: _array(items)}
        return self.scalar(typname, category)

    def _unescaped(self, table: Mapping[type, Encoder]) -> dict[type, Encoder]:
        """An element table: the element's text before COPY's escaping (applied once, to the whole array)."""
        return {kind: self._raw.get(fn, fn) for kind, fn in table.items() if kind is not type(None)}


# The encoders that escape their text for COPY, with the function giving the text unescaped.
_RAW: dict[Encoder, Encoder] = {_text: str, _bytea: lambda v: "\\x" + bytes(v).hex()}


def _escaped(raw: Callable[[Any], str]) -> Encoder:
    def encode(value: Any) -> str:
        return _text(raw(value))

    return encode


def encode_batch(plan: CopyPlan, rows: Sequence[Any]) -> str | None:
    """The batch in COPY's text format, or None when a value is not one COPY stores as the
    INSERT does (the batch then goes as the INSERT).

    Column by column, then line by line, with C code doing the work per value: each column's
    values are gathered with ``map(itemgetter)`` and their types checked as a set; a column of
    int, float or str alone (a str column with nothing to escape, found by one search over the
    column) goes into the line's format as ``%d``, ``%r`` or ``%s`` as it is; any other column
    is converted value by value through its table first. Each line is then ``format % values``
    over ``zip`` of the columns. No Python code runs per value for the common columns.
    """
    width = plan.width
    if not rows:
        return ""
    kinds = set(map(type, rows))
    if not all(issubclass(kind, (tuple, list)) for kind in kinds) or set(map(len, rows)) != {width}:
        return None  # a mapping, or a row of another width: the INSERT's business
    specs: list[str] = []
    columns: list[Sequence[Any]] = []
    try:
        for index, table in enumerate(plan.columns):
            values = list(map(itemgetter(index), rows))
            spec, column = _column_fields(table, values)
            specs.append(spec)
            columns.append(column)
    except Exception:  # noqa: BLE001 - an unknown type (KeyError), NotNative, any trouble: the INSERT decides
        return None
    line = "\t".join(specs)
    return "\n".join(map(line.__mod__, zip(*columns, strict=True))) + "\n"


_NONE = type(None)
# A column of only these types goes into the line's format with no conversion of its own, when
# its table converts them with the matching function (%d is int's repr, %r float's).
_SPECS: dict[type, tuple[str, Encoder]] = {int: ("%d", int.__repr__), float: ("%r", float.__repr__)}


def _column_fields(table: Mapping[type, Encoder], values: list[Any]) -> tuple[str, Sequence[Any]]:
    """One column: its format spec and its values (as they are, or converted to fields).
    Raises KeyError or NotNative for a value the column does not take as the INSERT would."""
    kinds = set(map(type, values))
    if not kinds.issubset(table):
        raise NotNative(f"a value of type {(kinds - table.keys()).pop().__name__}")
    if len(kinds) == 1:
        kind = next(iter(kinds))
        fn = table[kind]
        if fn is _text:
            if _SPECIAL.search("".join(values)) is None:
                return "%s", values  # nothing to escape: the values are the fields
            return "%s", list(map(_text, values))
        spec = _SPECS.get(kind)
        if spec is not None and spec[1] is fn:
            return spec[0], values
        return "%s", list(map(fn, values))
    nulls = _NONE in kinds
    if nulls:
        kinds.discard(_NONE)
        if not kinds:
            return "%s", ["\\N"] * len(values)
        if len(kinds) == 1:
            fn = table[next(iter(kinds))]
            return "%s", ["\\N" if value is None else fn(value) for value in values]
    return "%s", [table[value.__class__](value) for value in values]
