"""django-q2 entry points: thin callers of services."""

from __future__ import annotations

from jobs import services


def execute_run(run_id: int) -> str:
    run = services.run_claim(run_id=run_id, worker=services.worker_name())
    if run is None:
        return "nothing to claim"
    return services.run_execute(run, reload=False).status


def notify_flip(flip_id: int) -> str:
    from jobs import notify

    return notify.notify_flip(flip_id=flip_id)
