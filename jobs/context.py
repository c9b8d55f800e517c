"""What a running job can ask Jobsite (importable without Django).

    from jobs.context import run_context, report_progress

    def refresh_stats(days: int = 7) -> None:
        ctx = run_context()            # run id, job, scheduled_for, attempt, artifacts dir
        for i, day in enumerate(days_to_do):
            ...
            report_progress(i + 1, len(days_to_do), f"day {day}")

Shell jobs can report progress too, one JSON object per line on the file
descriptor in $JOBSITE_PROGRESS_FD (/dev/fd/N works in every shell; dash's
">&N" takes a single digit only):

    echo '{"done": 3, "total": 10, "message": "loading"}' > "/dev/fd/$JOBSITE_PROGRESS_FD"
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class RunContext:
    run_id: int
    job: str
    scheduled_for: datetime
    attempt: int
    trigger: str
    artifacts_dir: Path | None


def run_context() -> RunContext:
    """The current run, from the JOBSITE_* environment variables."""
    artifacts = os.environ.get("JOBSITE_ARTIFACTS_DIR")
    return RunContext(
        run_id=int(os.environ["JOBSITE_RUN_ID"]),
        job=os.environ["JOBSITE_JOB"],
        scheduled_for=datetime.fromisoformat(os.environ["JOBSITE_SCHEDULED_FOR"]),
        attempt=int(os.environ.get("JOBSITE_ATTEMPT", "1")),
        trigger=os.environ.get("JOBSITE_TRIGGER", ""),
        artifacts_dir=Path(artifacts) if artifacts else None,
    )


def report_progress(done: int | None = None, total: int | None = None, message: str = "") -> None:
    """Tell the run page how far the job is (shown as a progress bar)."""
    _send({"done": done, "total": total, "message": message})


def _send(payload: dict) -> None:
    fd = os.environ.get("JOBSITE_PROGRESS_FD")
    if not fd:
        return  # not running under Jobsite (e.g. a unit test of the job)
    line = (json.dumps(payload) + "\n").encode()
    try:
        os.write(int(fd), line)
    except OSError:
        pass  # Jobsite stopped listening; the job goes on
