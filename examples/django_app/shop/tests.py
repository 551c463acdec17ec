"""The example project's tests, run by ``manage.py test shop`` against a real cluster.

tests/test_django.py runs them on the suite's PostgreSQL and MariaDB clusters. The
replication tests need the cluster itself (to pause replication, or to kill the primary):
they load it from DBROUTER_TEST_CLUSTER_STATE (a `LocalCluster.save_state` file) and are
skipped without it. They print one ``RESULT`` line each, which tests/test_django.py checks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import unittest
from collections import Counter
from typing import Any

from django.core.management import call_command
from django.core.signals import got_request_exception
from django.db import connections, transaction
from django.db.utils import OperationalError
from django.test import Client, TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext

import dbrouter
from dbrouter.integrations.django import ReplicaRouter, get_router, read_your_writes

from .models import Item, Note

STATE = os.environ.get("DBROUTER_TEST_CLUSTER_STATE")


def cluster() -> Any:
    from dbrouter.cluster import LocalCluster

    return LocalCluster.load_state(str(STATE))


def replica_node() -> Any:
    return connections["replica"].dbrouter_node


class DjangoBehaviour(TransactionTestCase):
    """Django's own machinery on dbrouter connections (commits are real: TransactionTestCase)."""

    databases = {"default", "replica"}

    def test_the_test_database_is_the_primarys_and_the_replica_alias_mirrors_it(self) -> None:
        name = connections["default"].settings_dict["NAME"]
        self.assertTrue(name.startswith("test_"), name)
        self.assertEqual(connections["replica"].settings_dict["NAME"], name)
        self.assertIs(get_router("default"), get_router("replica"))
        with read_your_writes():
            Item.objects.create(name="mirror")
            self.assertTrue(Item.objects.filter(name="mirror").exists())
        self.assertEqual(connections["replica"].dbrouter_node.role, "replica")

    def test_migrations_run_on_the_primary_alias_only(self) -> None:
        router = ReplicaRouter()
        self.assertIs(router.allow_migrate("replica", "shop"), False)
        self.assertIsNone(router.allow_migrate("default", "shop"))
        # The replicas have the primary's migrations by replication: nothing to do there.
        with CaptureQueriesContext(connections["replica"]) as queries:
            call_command("migrate", database="replica", verbosity=0)
        self.assertFalse([q for q in queries if not q["sql"].lstrip().upper().startswith(("SELECT", "SHOW"))], queries)

    def test_reads_go_to_the_replica_alias_and_writes_to_the_primary(self) -> None:
        with read_your_writes():
            item = Item.objects.create(name="a")
            self.assertEqual(item._state.db, "default")
            read = Item.objects.get(pk=item.pk)
            self.assertEqual(read._state.db, "replica")
            note = Note.objects.create(item=read, text="related across aliases of one cluster")
            self.assertEqual(note._state.db, "default")
            self.assertEqual(read.notes.get().text, note.text)

    def test_atomic_nested_savepoints_and_on_commit(self) -> None:
        committed: list[str] = []
        with transaction.atomic():
            outer = Item.objects.create(name="outer")
            transaction.on_commit(lambda: committed.append("outer"))
            # Inside the transaction, reads go to the primary and see its own writes.
            self.assertEqual(Item.objects.get(pk=outer.pk)._state.db, "default")
            try:
                with transaction.atomic():
                    Item.objects.create(name="inner")
                    transaction.on_commit(lambda: committed.append("inner"))
                    raise RuntimeError("roll the savepoint back")
            except RuntimeError:
                pass
            with transaction.atomic():
                Item.objects.create(name="kept")
            self.assertEqual(committed, [])
        self.assertEqual(committed, ["outer"])
        with read_your_writes():
            Item.objects.using("default").filter(name="outer").update(stock=1)  # a write: replicas must catch up
            self.assertEqual(sorted(Item.objects.values_list("name", flat=True)), ["kept", "outer"])
        with self.assertRaises(ZeroDivisionError), transaction.atomic():
            Item.objects.create(name="rolled back")
            transaction.on_commit(lambda: committed.append("never"))
            raise ZeroDivisionError
        self.assertFalse(Item.objects.using("default").filter(name="rolled back").exists())
        self.assertEqual(committed, ["outer"])

    def test_select_for_update_runs_on_the_primary(self) -> None:
        item = Item.objects.create(name="locked", stock=5)
        with CaptureQueriesContext(connections["default"]) as queries, transaction.atomic():
            locked = Item.objects.select_for_update().get(pk=item.pk)
            locked.stock -= 1
            locked.save()
        self.assertEqual(locked._state.db, "default")
        self.assertTrue(any("FOR UPDATE" in q["sql"] for q in queries), queries.captured_queries)
        self.assertEqual(Item.objects.using("default").get(pk=item.pk).stock, 4)

    def test_bulk_create_and_iterator(self) -> None:
        with read_your_writes():
            Item.objects.bulk_create([Item(name=f"bulk{i}") for i in range(500)], batch_size=100)
            self.assertEqual(Item.objects.count(), 500)
            seen = 0
            vendor = connections["replica"].vendor
            for _ in Item.objects.iterator(chunk_size=50):
                if seen == 0 and vendor == "postgresql":
                    # A server-side cursor on the replica alias's connection (WITH HOLD: autocommit).
                    with connections["replica"].cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM pg_cursors WHERE is_holdable")
                        self.assertEqual(cursor.fetchone()[0], 1)
                seen += 1
            self.assertEqual(seen, 500)
        self.assertEqual(connections["replica"]._open_named, 0)

    def test_connection_queries_with_debug(self) -> None:
        with override_settings(DEBUG=True):
            connections["replica"].queries_log.clear()
            list(Item.objects.filter(name="nothing"))
            self.assertTrue(any("shop_item" in q["sql"] for q in connections["replica"].queries))

    def test_dbshell_points_at_the_primary(self) -> None:
        router = get_router()
        for alias in ("default", "replica"):
            wrapper = connections[alias]
            args, _ = wrapper.client.settings_to_cmd_args_env(wrapper.dbrouter_shell_settings(), [])
            self.assertIn(str(router.primary.adapter.address.port), " ".join(map(str, args)))

    def test_request_through_the_test_client(self) -> None:
        response = Client().post("/items/", {"name": "pen"})
        self.assertEqual(response.status_code, 201)
        self.assertTrue(response.json()["found"])
        self.assertEqual(Client().get("/healthz").json()["healthy"], True)

    def test_dbrouter_errors_are_django_operational_errors(self) -> None:
        from dbrouter.integrations.django import for_django

        error = for_django(dbrouter.NoPrimaryAvailable("no primary"))
        self.assertIsInstance(error, dbrouter.NoPrimaryAvailable)
        self.assertIsInstance(error, OperationalError)


@unittest.skipUnless(STATE, "needs DBROUTER_TEST_CLUSTER_STATE (tests/test_django.py sets it)")
class StaleReads(TransactionTestCase):
    """Create-then-read requests while every replica pauses its replay 1 s at a time."""

    databases = {"default", "replica"}

    def test_no_stale_read_and_most_reads_on_replicas(self) -> None:
        requests = int(os.environ.get("DBROUTER_DJANGO_REQUESTS", "10000"))
        local = cluster()
        stop = threading.Event()
        paused: list[tuple[float, float]] = []  # from the first pause to the last resume, each time

        def pause_replay() -> None:
            while not stop.is_set():
                start = time.monotonic()
                for node in local.replicas:
                    local.pause_replication(node)
                stop.wait(1.0)
                for node in local.replicas:
                    local.resume_replication(node)
                paused.append((start, time.monotonic()))
                stop.wait(1.0)

        # Without read-your-writes a read right after the write misses it while replay is paused.
        for node in local.replicas:
            local.pause_replication(node)
        try:
            item = Item.objects.create(name="control")
            control_missed = not Item.objects.filter(pk=item.pk).exists()
        finally:
            for node in local.replicas:
                local.resume_replication(node)

        client = Client()
        served: list[tuple[float, float, str]] = []  # (start, end, role of the node that read)
        stale = 0
        pauser = threading.Thread(target=pause_replay, name="pause-replay", daemon=True)
        started = time.monotonic()
        pauser.start()
        try:
            for i in range(requests):
                begin = time.monotonic()
                answer = client.post("/items/", {"name": f"r{i}"}).json()
                served.append((begin, time.monotonic(), answer["role"]))
                stale += not answer["found"]
        finally:
            stop.set()
            pauser.join()
            for node in local.replicas:
                local.resume_replication(node)
        elapsed = time.monotonic() - started
        # A read could go to a replica when no pause overlapped its request: during a pause
        # no replica has the write, and the primary must serve it.
        eligible = [role for begin, end, role in served
                    if not any(begin < resumed and end > start for start, resumed in paused)]
        on_replica = sum(role == "replica" for _, _, role in served)
        share = sum(role == "replica" for role in eligible) / max(1, len(eligible))
        print(f"RESULT stale-reads requests={requests} stale={stale} replica_reads={on_replica} "
              f"primary_reads={requests - on_replica} eligible={len(eligible)} share={share:.3f} "
              f"pauses={len(paused)} control_missed={control_missed} seconds={elapsed:.1f}", flush=True)
        self.assertTrue(control_missed, "a read without read-your-writes saw the write during a pause")
        self.assertEqual(stale, 0)
        self.assertGreaterEqual(share, 0.8)


@unittest.skipUnless(STATE and os.environ.get("DBROUTER_TEST_FAILOVER"), "needs a cluster of its own to kill")
class KillPrimaryPromote(TransactionTestCase):
    """Requests while the primary is killed and a replica promoted."""

    databases = {"default", "replica"}

    def test_reads_go_on_and_writes_come_back(self) -> None:
        local = cluster()
        router = get_router()
        health = router.config.monitor.health_interval
        seed = [Item.objects.create(name=f"seed{i}").pk for i in range(20)]
        connections.close_all()  # as a request's end does: no connection of this thread is held across the fault
        time.sleep(0.5)  # replicated
        # Django's test client re-raises the last request exception of any thread (its signal is
        # process-wide): each thread collects its own here instead.
        raised: dict[int, BaseException] = {}

        def note_exception(sender: Any, request: Any = None, **kwargs: Any) -> None:
            raised[threading.get_ident()] = sys.exc_info()[1]  # type: ignore[assignment]

        got_request_exception.connect(note_exception)
        self.addCleanup(got_request_exception.disconnect, note_exception)

        def outcome(response: Any) -> BaseException | None:
            error = raised.pop(threading.get_ident(), None)
            return error if response.status_code >= 500 else None

        stop = threading.Event()
        lock = threading.Lock()
        reads: Counter[str] = Counter()
        writes: list[tuple[float, bool, str]] = []  # (end time, succeeded, error type)
        slowest = [0.0]

        def reader() -> None:
            client = Client(raise_request_exception=False)
            while not stop.is_set():
                t = time.monotonic()
                response = client.get(f"/items/{seed[int(t * 1000) % len(seed)]}/")
                error = outcome(response)
                kind = "ok" if response.status_code == 200 else type(error).__name__ if error else str(response.status_code)
                with lock:
                    reads[kind] += 1
                    slowest[0] = max(slowest[0], time.monotonic() - t)
            connections.close_all()

        def writer() -> None:
            client = Client(raise_request_exception=False)
            while not stop.is_set():
                t = time.monotonic()
                response = client.post("/items/", {"name": "w"})
                error = outcome(response)
                if response.status_code == 201:
                    result = (time.monotonic(), True, "")
                else:
                    result = (time.monotonic(), False, f"{type(error).__module__}.{type(error).__name__}"
                              f"{'' if isinstance(error, dbrouter.DbRouterError) else ' (not dbrouter)'}")
                    time.sleep(0.05)
                with lock:
                    writes.append(result)
                    slowest[0] = max(slowest[0], time.monotonic() - t)
            connections.close_all()

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
        threads.append(threading.Thread(target=writer, daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        killed = time.monotonic()
        local.primary.kill()
        time.sleep(1.0)
        new = local.most_advanced()
        local.promote(new)
        promoted = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        connections.close_all()  # this thread's connections were on the old primary: give them back
        local.save_state(str(STATE))  # the new primary, for the test's teardown and the caller
        after = [w for w in writes if w[0] >= killed + 0.2]  # not in flight at the kill
        first_ok = min((w[0] for w in after if w[1]), default=None)
        back = None if first_ok is None else first_ok - promoted
        errors = Counter(w[2] for w in writes if not w[1])
        print(f"RESULT failover reads={dict(reads)} writes_ok={sum(w[1] for w in writes)} "
              f"write_errors={dict(errors)} writes_back_after={back} health_interval={health} "
              f"slowest_request={slowest[0]:.2f} down_for={promoted - killed:.2f}", flush=True)
        self.assertEqual(set(reads), {"ok"}, reads)
        self.assertIsNotNone(back)
        # Writes are back within 2 health intervals of the promotion. (A writer thread that held
        # the old primary's connection under one alias used to wait out acquire_timeout for
        # another under the other alias: the probes now fail such waits when they see the node down.)
        self.assertLessEqual(back, 2 * health)
        self.assertFalse([e for e in errors if "not dbrouter" in e], errors)
        self.assertLess(slowest[0], 10.0)
