"""Child-process entry points for python and SQL jobs (no Django in the child)."""

from __future__ import annotations

from jobs.context import _send


def report_failure(summary: str) -> None:
    """Tell Jobsite what went wrong, for the run's summary: a job's own last
    line of output (a print before os._exit) must not pass for the reason."""
    _send({"failure": summary})
