"""The chaos workload: worker threads doing a seeded mix of every Router entry point.

Every row written carries a unique id and the port of the server that
executed the INSERT (``inet_server_port()`` / ``@@port``), and every write is
recorded with its call window and outcome, so that the invariants can be
checked against the final primary afterwards.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from ..errors import BulkWriteError, DbRouterError, WriteOutcomeUnknown

if TYPE_CHECKING:
    from .. import Router, Transaction

__all__ = ["OPERATIONS", "CommitWitness", "Workload", "WriteRecord"]

log = logging.getLogger("dbrouter.chaos")

TABLE = "chaos_writes"

# Operation -> relative weight in each worker's mix.
OPERATIONS: dict[str, float] = {
    "read": 35.0,
    "write": 18.0,
    "transaction": 10.0,
    "run_transaction": 10.0,
    "session": 10.0,
    "session_transaction": 4.0,
    "write_many": 5.0,
    "sqlalchemy": 8.0,
}

# One worker in READER_SHARE only reads, as an application's read-only request paths do:
# while the primary is down every mixed worker soon waits in a write for the failover, and
# without these no read would show that a recovered replica serves again.
READER_SHARE = 8
READ_ONLY: dict[str, float] = {"read": 1.0}

ACKED = "acked"
UNKNOWN = "unknown"
FAILED = "failed"


@dataclass
class WriteRecord:
    """One row a worker tried to write: its call window and what the application was told."""

    id: int
    op: str
    start: float
    end: float = 0.0
    outcome: str = FAILED  # ACKED, UNKNOWN (WriteOutcomeUnknown or a failed commit) or FAILED
    error: str | None = None
    message: str = ""  # the first line of the error
    commit_returned: bool = False  # the COMMIT was seen returning (see CommitWitness)


class CommitWitness:
    """Tells whether a transaction's COMMIT returned, as seen from the worker's own thread.

    Why this way: the router runs COMMIT itself when the ``with`` block (or the
    ``run_transaction`` function) ends, so the caller only sees the exception,
    never whether COMMIT answered before something else failed (for example a
    session reading the primary's position after the commit). Checking the
    server afterwards cannot tell either: a committed row is also there when
    COMMIT's answer was lost, which is a legitimate WriteOutcomeUnknown. So the
    witness installs a profile function (``sys.setprofile``, this thread only)
    as the body's last statement and removes it once the block has ended. It
    notes a ``c_return`` (never a ``c_exception``) of the driver's commit
    primitive: a C function named ``commit`` (mysql-connector's
    ``_cmysql.commit``) or a C call made from a Python frame named ``commit``
    (dbrouter's PostgreSQL adapter runs ``cursor.execute("COMMIT")`` there).
    It can miss a COMMIT (a driver that commits some other way), which only
    weakens the check; it cannot see one that did not return, so it never
    reports a false violation.
    """

    __slots__ = ("returned",)

    def __init__(self) -> None:
        self.returned = False

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_return" and (getattr(arg, "__name__", "") == "commit" or frame.f_code.co_name == "commit"):
            self.returned = True

    def arm(self) -> None:
        self.returned = False
        sys.setprofile(self._profile)

    @staticmethod
    def disarm() -> None:
        sys.setprofile(None)


@dataclass
class Workload:
    """``threads`` workers running until `stop`; ``on_done(index)`` is called after every operation."""

    router: Router
    seed: int
    threads: int
    port_sql: str
    session_factory: Any  # dbrouter.integrations.sqlalchemy.routing_sessionmaker(...)
    on_done: Callable[[int], None]
    t0: float = 0.0
    writes: dict[int, WriteRecord] = field(default_factory=dict)
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    unexpected: list[str] = field(default_factory=list)  # tracebacks of errors no fault explains
    ryw_violations: list[str] = field(default_factory=list)
    last_ok: dict[tuple[str, int], float] = field(default_factory=dict)  # (read|write, port) -> latest call start
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(target=self._work, args=(index,), name=f"chaos-worker-{index}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def stop(self, timeout: float) -> list[threading.Thread]:
        """Ask the workers to stop; returns those still running after ``timeout`` seconds."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return [w for w in self._workers if w.is_alive()]

    @property
    def workers(self) -> list[threading.Thread]:
        return list(self._workers)

    # -- the loop --------------------------------------------------------------------

    def _work(self, index: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + index)
        mix = READ_ONLY if index < max(1, self.threads // READER_SHARE) else OPERATIONS
        ops = list(mix)
        weights = [mix[o] for o in ops]
        ids = iter(range((index + 1) * 10_000_000, (index + 2) * 10_000_000))
        run: dict[str, Callable[[random.Random, Any], None]] = {
            "read": self._read, "write": self._write, "transaction": self._transaction,
            "run_transaction": self._run_transaction, "session": self._session,
            "session_transaction": self._session_transaction, "write_many": self._write_many,
            "sqlalchemy": self._sqlalchemy,
        }
        while not self._stop.is_set():
            op = rng.choices(ops, weights)[0]
            try:
                run[op](rng, ids)
            except Exception as exc:  # noqa: BLE001 - every failure is classified and counted
                self._count(op, exc)
            else:
                self._count(op, None)
            finally:
                CommitWitness.disarm()
            self.on_done(index)
            self._stop.wait(rng.uniform(0.005, 0.04))  # think time: 32 threads on 2 shared cores

    def _count(self, op: str, exc: BaseException | None) -> None:
        kind = "ok" if exc is None else _error_kind(exc)
        with self._lock:
            self.counts[op][kind] += 1
            if exc is not None and not _expected(exc) and len(self.unexpected) < 20:
                self.unexpected.append(f"{op}: " + "".join(traceback.format_exception(exc)).rstrip())

    def _seen(self, what: str, port: Any, start: float) -> None:
        key = (what, int(port))
        with self._lock:
            if self.last_ok.get(key, 0.0) < start:
                self.last_ok[key] = start

    def _new(self, ids: Any, op: str, start: float) -> WriteRecord:
        record = WriteRecord(next(ids), op, start)
        with self._lock:
            self.writes[record.id] = record
        return record

    @staticmethod
    def _settle(records: list[WriteRecord], exc: BaseException | None, committing: bool = True,
                witness: CommitWitness | None = None) -> None:
        """Record the outcome of ``records`` (one call): acknowledged, unknown or failed."""
        end = time.monotonic()
        for record in records:
            record.end = end
            if witness is not None:
                record.commit_returned = witness.returned
            if exc is None:
                record.outcome = ACKED
            else:
                record.error = _error_kind(exc)
                record.message = (str(exc).strip().splitlines() or [""])[0][:300]
                record.outcome = UNKNOWN if isinstance(exc, WriteOutcomeUnknown) or (committing and _sa(exc)) else FAILED

    # -- operations -------------------------------------------------------------------

    def _insert(self) -> str:
        return f"INSERT INTO {TABLE} (id, port, op) VALUES (%s, {self.port_sql}, %s)"

    def _read(self, rng: random.Random, ids: Any) -> None:
        start = time.monotonic()
        rows = self.router.read(f"SELECT {self.port_sql}, count(*) FROM {TABLE} WHERE id = %s",
                                (rng.randrange(10_000_000, 330_000_000),))
        self._seen("read", rows[0][0], start)

    def read_once(self) -> None:
        """One read through the router, outside the mix (the rotation checks use it); its
        failure is not counted: the workers' own reads are what invariant f judges."""
        start = time.monotonic()
        try:
            rows = self.router.read(f"SELECT {self.port_sql}")
        except Exception:  # noqa: BLE001 - a failed read simply shows no node serving
            return
        self._seen("read", rows[0][0], start)

    def _write(self, rng: random.Random, ids: Any) -> None:
        record = self._new(ids, "write", time.monotonic())
        try:
            self.router.write(self._insert(), (record.id, "write"))
        except BaseException as exc:
            self._settle([record], exc)
            raise
        self._settle([record], None)

    def _transaction(self, rng: random.Random, ids: Any) -> None:
        start = time.monotonic()
        records = [self._new(ids, "transaction", start) for _ in range(2)]
        witness = CommitWitness()
        try:
            with self.router.transaction() as tx:
                port = self._fill(tx, records, "transaction")
                witness.arm()  # the last statement of the body: COMMIT comes next
        except BaseException as exc:
            CommitWitness.disarm()
            self._settle(records, exc, witness=witness)
            raise
        CommitWitness.disarm()
        self._settle(records, None, witness=witness)
        self._seen("write", port, start)

    def _fill(self, tx: Transaction, records: list[WriteRecord], op: str) -> Any:
        for record in records:
            tx.execute(self._insert(), (record.id, op))
        rows = tx.read(f"SELECT {self.port_sql}, count(*) FROM {TABLE} WHERE id = %s", (records[0].id,))
        return rows[0][0]

    def _run_transaction(self, rng: random.Random, ids: Any) -> None:
        start = time.monotonic()
        records = [self._new(ids, "run_transaction", start) for _ in range(2)]
        witness = CommitWitness()

        def body(tx: Transaction) -> Any:
            CommitWitness.disarm()  # a rerun of the body: only the last COMMIT counts
            witness.returned = False
            port = self._fill(tx, records, "run_transaction")
            witness.arm()
            return port

        try:
            port = self.router.run_transaction(body)
        except BaseException as exc:
            CommitWitness.disarm()
            self._settle(records, exc, witness=witness)
            raise
        CommitWitness.disarm()
        self._settle(records, None, witness=witness)
        self._seen("write", port, start)

    def _session(self, rng: random.Random, ids: Any) -> None:
        record = self._new(ids, "session", time.monotonic())
        with self.router.session() as session:
            try:
                session.write(self._insert(), (record.id, "session"))
            except BaseException as exc:
                self._settle([record], exc)
                raise
            self._settle([record], None)
            rows = session.read(f"SELECT count(*) FROM {TABLE} WHERE id = %s", (record.id,))
            if int(rows[0][0]) != 1:
                self._ryw(f"session read of row {record.id} saw {rows[0][0]} rows after the write was acknowledged")

    def _session_transaction(self, rng: random.Random, ids: Any) -> None:
        start = time.monotonic()
        records = [self._new(ids, "session_transaction", start) for _ in range(2)]
        witness = CommitWitness()
        with self.router.session() as session:
            try:
                with session.transaction() as tx:
                    self._fill(tx, records, "session_transaction")
                    witness.arm()
            except BaseException as exc:
                CommitWitness.disarm()
                self._settle(records, exc, witness=witness)
                raise
            CommitWitness.disarm()
            self._settle(records, None, witness=witness)
            rows = session.read(f"SELECT count(*) FROM {TABLE} WHERE id IN (%s, %s)", (records[0].id, records[1].id))
            if int(rows[0][0]) != 2:
                self._ryw(f"session read of rows {records[0].id}, {records[1].id} saw {rows[0][0]} of 2 after the "
                          "transaction committed")

    def _write_many(self, rng: random.Random, ids: Any) -> None:
        start = time.monotonic()
        records = [self._new(ids, "write_many", start) for _ in range(rng.randrange(4, 13))]
        batch = 4
        try:
            self.router.write_many(self._insert(), [(r.id, "write_many") for r in records], batch_size=batch, workers=2)
        except BulkWriteError as exc:
            for index in range(0, len(records), batch):
                failure = exc.failures.get(index // batch)
                self._settle(records[index:index + batch], failure)
            raise
        except BaseException as exc:
            self._settle(records, exc)
            raise
        self._settle(records, None)

    def _sqlalchemy(self, rng: random.Random, ids: Any) -> None:
        from sqlalchemy import text

        record = self._new(ids, "sqlalchemy", time.monotonic())
        committing = False
        with self.session_factory() as session:
            try:
                session.execute(text(f"INSERT INTO {TABLE} (id, port, op) VALUES (:id, {self.port_sql}, 'sqlalchemy')"),
                                {"id": record.id})
                committing = True
                session.commit()
            except BaseException as exc:
                # SQLAlchemy reports no WriteOutcomeUnknown: a failed commit counts as unknown.
                self._settle([record], exc, committing=committing)
                raise
            self._settle([record], None)
            count = session.execute(text(f"SELECT count(*) FROM {TABLE} WHERE id = :id"), {"id": record.id}).scalar()
            if int(count or 0) != 1:
                self._ryw(f"SQLAlchemy session read of row {record.id} saw {count} rows after its commit "
                          f"({_where_read(session, self.port_sql)})")

    def _ryw(self, message: str) -> None:
        with self._lock:
            if len(self.ryw_violations) < 50:
                self.ryw_violations.append(f"{time.monotonic() - self.t0:.2f}s: {message}")


def _where_read(session: Any, port_sql: str) -> str:
    """Evidence for a read-your-writes violation: where the session's read went, the position
    it waited for, and what that node holds now (asked on the read's own connection)."""
    from sqlalchemy import text

    reader = session._tx_reader
    facts = [f"read on {reader.logging_name if reader is not None else None}", f"position {session.position!r}"]
    sql = ("SELECT @@global.gtid_current_pos, @@server_id, @@read_only, @@port" if port_sql == "@@port"
           else "SELECT pg_last_wal_replay_lsn()::text, pg_current_wal_lsn()::text, pg_is_in_recovery(), "
                "current_setting('port')")
    try:
        facts.append(f"that node now: {tuple(session.execute(text(sql)).one())}")
    except Exception as exc:  # noqa: BLE001 - evidence only
        facts.append(f"that node cannot say: {str(exc).splitlines()[0]}")
    return ", ".join(facts)


def _sa(exc: BaseException) -> bool:
    """An error raised by SQLAlchemy (only the SQLAlchemy operation reports commits this way)."""
    return type(exc).__module__.startswith("sqlalchemy")


def _error_kind(exc: BaseException) -> str:
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
    if _sa(exc) and orig is not None:
        return f"sqlalchemy.{name}({type(orig).__name__})"
    if isinstance(exc, DbRouterError) or not isinstance(exc, Exception):
        return name
    return f"{type(exc).__module__.split('.')[0]}.{name}"


def _expected(exc: BaseException) -> bool:
    """A failure that a fault can legitimately cause: a dbrouter error, or a driver error that
    is not a caller error (a syntax or schema error would be a bug in the harness)."""
    if isinstance(exc, DbRouterError):
        return True
    inner = getattr(exc, "orig", None) if _sa(exc) else exc
    if inner is None:
        # SQLAlchemy's own errors without a driver error: a closed or invalidated connection.
        return type(exc).__name__ in {"PendingRollbackError", "ResourceClosedError", "InvalidRequestError"}
    if isinstance(inner, DbRouterError):
        return True
    module = type(inner).__module__
    if not module.startswith(("psycopg", "mysql", "_mysql_connector")):  # psycopg2 and psycopg 3
        return False
    return not any(cls.__name__ in ("ProgrammingError", "NotSupportedError") for cls in type(inner).__mro__)
