"""django-q2's ORM broker, handing out a burst's tasks in batches.

django-q2's own ORM broker locks each task it hands out with an UPDATE of
its own. A cluster has one pusher process doing that, so on SQLite every
task costs the pusher a turn at the database's single write lock, queued
behind the scheduler's and the workers' writes. With 100 jobs due in the
same minute that turn took about 20 ms a task: the pusher handed out 50
tasks a second, and 4 workers waited for it (docs/PERFORMANCE.md). This
broker locks up to Q_BULK tasks (Q_CLUSTER["bulk"]) in one transaction: a
turn at the lock per batch.

Used when the ORM broker is (Q_CLUSTER["broker_class"] in settings); Redis
needs none of this.
"""

from __future__ import annotations

from time import sleep

from django.db import transaction
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf


class BatchingOrmBroker(ORM):
    def dequeue(self) -> list[tuple[int, str]] | None:
        """Up to Conf.BULK due tasks as (id, payload), locked for this
        cluster until Conf.RETRY seconds from now; None when there are none.

        A plain read first (no lock taken while the queue is empty, which
        the pusher asks 1/Q_POLL times a second), then the read again and
        the UPDATE in one transaction: on SQLite an IMMEDIATE one, which
        holds the write lock from its start; on PostgreSQL the rows are
        locked FOR UPDATE, and rows another cluster holds are skipped.
        """
        now = timezone.now()
        queue = self.get_connection()
        due = queue.filter(key=self.list_key, lock__lt=now)
        if not due.values_list("id", flat=True)[:1]:
            sleep(Conf.POLL)
            return None
        with transaction.atomic(using=Conf.ORM):
            tasks = list(
                due.select_for_update(skip_locked=True)
                .order_by("id")
                .values_list("id", "payload")[: Conf.BULK]
            )
            if tasks:
                queue.filter(id__in=[pk for pk, _ in tasks]).update(lock=self.timeout(None))
        return tasks
