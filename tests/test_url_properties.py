"""Property tests (Hypothesis) of URL and configuration parsing.

A node URL with any password (printable, control, non-ASCII, URL separators, percent-encoded
or not), host, port, database and options either parses to exactly what was written or fails
with a `ConfigurationError`, and the password never shows: not in an error, a ``repr``, the
config, ``stats()``, a log line, an event or a Prometheus label.

Each password holds a marker of 11 characters that nothing else generated here can contain
(it starts with an uppercase 'Q', hosts are lower case, and 'Q' is no hex digit, so no
percent-escape before it can eat into it). Checking for the marker as well as the whole
password catches a leak of part of a password, and a short password like 'a' cannot make
the check pass or fail by chance.
"""

from __future__ import annotations

import json
import logging
import math
import string
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dbrouter.adapters.mysql  # noqa: F401 - imported here, not inside the first timed example
import dbrouter.adapters.postgres  # noqa: F401
from dbrouter import ConfigurationError, DbRouterError, Router
from dbrouter.config import SECTIONS, load_router_config
from dbrouter.metrics import RouterCollector
from dbrouter.url import SCHEMES, parse_address

# -- strategies ---------------------------------------------------------------------------------

SEPARATORS = list("/?#@:%&=+;, []'\"\\\t\n\x00")
MARKER_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789"
LOWER = string.ascii_lowercase + string.digits

markers = st.text(alphabet=MARKER_CHARS, min_size=10, max_size=10).map(lambda s: "Q" + s)
# Any code point but lone surrogates (which no str from a file or the environment holds),
# with the characters that end a part of a URL drawn often.
TOKENS = ["%00", "%2F", "%40", "%", "%C3", "%zz", "://", "@db9", ":5432/", ",postgresql://x", "\u00e9", "\U0001f600"]
wild = st.lists(
    st.one_of(st.sampled_from(SEPARATORS), st.sampled_from(TOKENS), st.characters(exclude_categories=("Cs",))),
    max_size=6,
).map("".join)


@st.composite
def passwords(draw: st.DrawFn) -> tuple[str, str]:
    marker = draw(markers)
    return draw(wild) + marker + draw(wild), marker


labels = st.text(alphabet=LOWER + "-", min_size=1, max_size=8).filter(lambda s: s[0] != "-")
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "[::1]", "[fe80::1]", "db1"]),
    st.lists(labels, min_size=1, max_size=3).map(".".join),
)
PG_OPTIONS = ["sslmode", "application_name", "connect_timeout", "keepalives_count", "no_such_option"]
MY_OPTIONS = ["ssl_disabled", "charset", "read_timeout", "no_such_option"]
NUMERIC_OPTIONS = sorted(
    f.name for cls in SECTIONS.values() for f in __import__("dataclasses").fields(cls)
    if any(t in str(f.type) for t in ("int", "float"))
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**12), st.booleans(), st.none(),
    st.text(max_size=3), st.sampled_from([0, 1, 0.001, 3600, 86400, 2147483.647, 1e308]),
)


@dataclass
class Case:
    scheme: str
    user: str
    password: str
    marker: str
    encoded: bool
    in_query: bool
    host: str
    port: int | None
    database: str | None
    options: dict[str, str]
    router_options: dict[str, Any]

    def url(self, host: str | None = None) -> str:
        secret = quote(self.password, safe="") if self.encoded else self.password
        port = "" if self.port is None else f":{self.port}"
        db = "" if self.database is None else "/" + quote(self.database, safe="")
        options = dict(self.options)
        if self.in_query:
            options["password"] = self.password
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in options.items())
        return (f"{self.scheme}://{quote(self.user, safe='')}:{secret}@{host or self.host}{port}{db}"
                + (f"?{query}" if query else ""))

    @property
    def expected_password(self) -> str:
        return self.password if self.encoded else unquote(self.password, errors="strict")

    @property
    def expected_host(self) -> str:
        return self.host.strip("[]")


@st.composite
def cases(draw: st.DrawFn) -> Case:
    scheme = draw(st.sampled_from(sorted(SCHEMES)))
    password, marker = draw(passwords())
    keys = PG_OPTIONS if SCHEMES[scheme] == "postgres" else MY_OPTIONS
    return Case(
        scheme=scheme,
        user=draw(st.one_of(st.sampled_from(["app", "", "a.b-c_d", "j\u00fcrgen"]), st.text(alphabet=LOWER, min_size=1, max_size=6))),
        password=password,
        marker=marker,
        encoded=draw(st.booleans()),
        in_query=draw(st.booleans()) and SCHEMES[scheme] == "postgres",  # libpq takes ?password=
        host=draw(hosts),
        port=draw(st.one_of(st.none(), st.integers(1, 65535), st.integers(-3, 0), st.integers(65536, 10**6))),
        database=draw(st.one_of(st.none(), st.text(alphabet=LOWER + "_", min_size=1, max_size=8))),
        options=draw(st.dictionaries(st.sampled_from(keys), st.text(max_size=4), max_size=2)),
        router_options=draw(st.one_of(st.just({}), st.dictionaries(st.sampled_from(NUMERIC_OPTIONS), numbers, max_size=3))),
    )


# -- what is shown ------------------------------------------------------------------------------


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every line logged under ``dbrouter`` (with its traceback), formatted as a handler would."""
    lines: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    logger = logging.getLogger("dbrouter")
    handler, level = Capture(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def shown_by(router: Router) -> list[str]:
    """Everything a router shows about itself: reprs, its config, stats and metric labels."""
    texts = [repr(router), repr(router.config), str(router.config), json.dumps(router.stats(), default=str)]
    for node in router.nodes:
        texts += [repr(node.address), str(node.address), repr(node.adapter), repr(node.pool), node.name]
    for family in RouterCollector(router).collect():
        texts += [f"{sample.name} {sample.labels}" for sample in family.samples]
    return texts


def assert_hidden(case_password: str, marker: str, texts: list[str]) -> None:
    for text in texts:
        assert case_password not in text and marker not in text, text


def error_texts(exc: BaseException) -> list[str]:
    texts = [str(exc), repr(exc)]
    if exc.__cause__ is not None:
        texts += [str(exc.__cause__), repr(exc.__cause__)]
    return texts


# -- the properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=timedelta(seconds=5), database=None)
@given(case=cases())
def test_a_url_parses_to_what_was_written_or_is_refused_and_never_shows_the_password(case: Case) -> None:
    url = case.url()
    with captured_logs() as logs:
        texts: list[str] = []
        try:
            address = parse_address(url)
        except ConfigurationError as exc:
            address = None
            event("URL refused")
            texts += error_texts(exc)
            well_formed = case.encoded and (case.port is None or 1 <= case.port <= 65535)
            assert not well_formed or "\x00" in case.password, f"refused a well-formed URL: {exc}"
        else:
            event("URL parsed (unencoded password)" if not case.encoded else "URL parsed")
            assert address.engine == SCHEMES[case.scheme]
            # No driver can send a NUL (they pass C strings): refused here, not at connect time.
            assert all("\x00" not in (part or "") for part in (address.user, address.password, address.database))
            assert address.user == (case.user or None)
            assert address.password == case.expected_password
            assert address.host == case.expected_host
            assert address.port == (case.port or (5432 if address.engine == "postgres" else 3306))
            assert address.database == case.database
            expected_options = dict(case.options, **({"password": case.password} if case.in_query else {}))
            assert dict(address.options) == expected_options
            texts += [repr(address), str(address), address.redacted, address.name]

        try:
            router = Router(url, [case.url(host="replica.invalid")], open=False, **case.router_options)
        except ConfigurationError as exc:
            event("router refused")
            texts += error_texts(exc)
        else:
            event("router built")
            assert address is not None, "the router took a URL that parse_address refused"
            try:
                texts += shown_by(router)
                for section in SECTIONS:  # every accepted number is finite
                    for value in vars(getattr(router.config, section)).values():
                        if isinstance(value, float):
                            assert math.isfinite(value)
            finally:
                router.close()

        if address is not None and "://" not in case.password:
            # DBROUTER_REPLICAS: commas inside passwords stay inside them.
            env = {"DBROUTER_PRIMARY": url, "DBROUTER_REPLICAS": f"{case.url(host='r1.invalid')},{case.url(host='r2.invalid')}"}
            try:
                config = load_router_config(None, env=env)
            except ConfigurationError as exc:
                texts += error_texts(exc)
            else:
                assert [r.url for r in config.replicas] == [case.url(host="r1.invalid"), case.url(host="r2.invalid")]
                texts += [repr(config), str(config)]
    assert_hidden(case.password, case.marker, texts + logs)


@pytest.mark.parametrize("engine", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mysql", marks=pytest.mark.mysql)])
@settings(max_examples=5, deadline=timedelta(seconds=30), database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=passwords())
def test_a_wrong_password_never_shows_in_errors_events_logs_stats_or_metrics(
    engine: str, request: pytest.FixtureRequest, drawn: tuple[str, str]
) -> None:
    password, marker = drawn
    password = password.replace("\x00", "")  # no driver can send a NUL: refused at parse time (see above)
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    scheme = "postgresql" if engine == "postgres" else "mariadb"
    urls = [f"{scheme}://{cluster.user}:{quote(password, safe='')}@127.0.0.1:{node.port}/{cluster.database}"
            for node in cluster.nodes[:2]]
    events: list[Any] = []
    with captured_logs() as logs:
        texts: list[str] = []
        try:
            router = Router(urls[0], urls[1:], open=False, min_size=0, connect_timeout=2, health_interval=0.05,
                            fail_max=1, retry_attempts=1)
        except ConfigurationError as exc:
            texts += error_texts(exc)
        else:
            router.on("*", events.append)
            try:
                router.open()
                router.wait_for_probes(2, timeout=15)
                for call in (lambda: router.read("SELECT 1"), lambda: router.write("SELECT 1")):
                    with pytest.raises(DbRouterError) as info:
                        call()
                    texts += error_texts(info.value)
                texts += shown_by(router)
            finally:
                router.close()
    assert events, "the failed logins raised no event"
    texts += [f"{e!r} {e}" for e in events]
    assert_hidden(password, marker, texts + logs)
