"""The ORM broker that hands out a burst's tasks in batches (jobs/broker.py)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_q.conf import Conf
from django_q.models import OrmQ
from django_q.signing import SignedPackage

from jobs.broker import BatchingOrmBroker


@pytest.fixture
def broker(db, monkeypatch):
    monkeypatch.setattr(Conf, "ORM", "default")
    monkeypatch.setattr(Conf, "BULK", 10)
    monkeypatch.setattr(Conf, "POLL", 0.01)
    return BatchingOrmBroker(list_key="burst")


def enqueue(broker: BatchingOrmBroker, count: int) -> list[int]:
    return [broker.enqueue(SignedPackage.dumps({"id": str(n), "n": n})) for n in range(count)]


def test_a_burst_is_handed_out_in_batches_oldest_first_each_task_once(broker):
    ids = enqueue(broker, 25)

    batches = [broker.dequeue() for _ in range(3)]

    assert [len(batch) for batch in batches] == [10, 10, 5]
    handed_out = [pk for batch in batches for pk, _ in batch]
    assert handed_out == ids
    assert [SignedPackage.loads(payload)["n"] for _, payload in batches[0]] == list(range(10))
    # Locked for this cluster: neither this one nor another sees them again.
    assert broker.dequeue() is None
    assert BatchingOrmBroker(list_key="burst").dequeue() is None
    assert OrmQ.objects.filter(key="burst").count() == 25  # until acknowledged
    broker.acknowledge(handed_out[0])
    assert OrmQ.objects.filter(key="burst").count() == 24


def test_a_batch_takes_one_write_where_django_q2_takes_one_per_task(broker):
    enqueue(broker, 10)

    with CaptureQueriesContext(connection) as captured:
        assert len(broker.dequeue()) == 10

    writes = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(writes) == 1, writes


def test_tasks_of_another_queue_or_not_yet_due_stay(broker):
    other = BatchingOrmBroker(list_key="elsewhere")
    enqueue(other, 3)
    (late,) = enqueue(broker, 1)
    OrmQ.objects.filter(pk=late).update(lock=OrmQ.objects.get(pk=late).lock.replace(year=2999))

    assert broker.dequeue() is None
    assert len(other.dequeue()) == 3
