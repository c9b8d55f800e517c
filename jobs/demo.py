"""Demo callables for python jobs (used by the demo jobs and the tests)."""

from __future__ import annotations

import logging
import time
import warnings

from jobs.context import report_progress, run_context

log = logging.getLogger("jobs.demo")


def count_to(n: int = 10, pause: float = 0.5) -> int:
    """Count to n, reporting progress; prints, logs and warns along the way."""
    ctx = run_context()
    print(f"counting to {n} for run {ctx.run_id} (attempt {ctx.attempt})")
    for i in range(1, n + 1):
        time.sleep(pause)
        report_progress(i, n, f"counted {i}")
        log.info("reached %d", i)
    warnings.warn("demo warning: counting is done", UserWarning, stacklevel=1)
    return n


def fail(message: str = "the demo failure") -> None:
    raise ValueError(message)


def write_report(rows: int = 3) -> None:
    """Write a small CSV into the run's artifacts directory."""
    ctx = run_context()
    assert ctx.artifacts_dir is not None
    path = ctx.artifacts_dir / "report.csv"
    with path.open("w") as f:
        f.write("n,square\n")
        for i in range(rows):
            f.write(f"{i},{i * i}\n")
    print(f"wrote {rows} rows to {path.name}")
