from __future__ import annotations

import multiprocessing

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from django_q.signals import post_spawn

        from jobs import checks  # noqa: F401  (registers system checks)

        post_spawn.connect(_worker_adopts_orphans, dispatch_uid="jobs.adopt_orphans")


def _worker_adopts_orphans(sender, proc_name: str, **kwargs) -> None:
    """A django-q2 worker inherits what its jobs leave behind with `setsid`
    (execution.adopt_orphans). Not in sync mode, where the worker loop runs
    inside a process (a test run, a shell) that has children of its own."""
    if multiprocessing.parent_process() is not None:
        from jobs import execution

        execution.adopt_orphans()
