"""A run's scratch directory: $JOBSITE_ARTIFACTS_DIR is its artifacts/,
and the SQL kind's connection file lives beside it.

Each worker process keeps one and hands it to its next run, under a new
name, if the last run left it empty and as it was made; otherwise it is
removed and the next run gets a new one, so no run ever sees another's
files. Making and removing two directories for
every run cost 0.4 ms of CPU and 0.7 ms of the worker's time on a disk
mounted with `discard` (docs/PERFORMANCE.md, Throughput, seventh round).
The kept directory is removed when the process exits.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from multiprocessing import util
from pathlib import Path

from django.conf import settings

_kept: dict[int, Path] = {}  # process id -> its empty scratch directory
_exit_hooks: set[int] = set()  # processes that remove their kept directory at exit


def take() -> Path:
    """An empty directory with an empty artifacts/ in it, for one run."""
    pid = os.getpid()
    workdir = _kept.pop(pid, None)
    if workdir is not None and workdir.parent == _base():
        # A new name for every run: a process the last run left behind (one
        # that escaped its group) writes to the old path and finds nothing.
        # Then checked again, for what it wrote before the rename.
        renamed = workdir.with_name(_prefix(pid) + secrets.token_hex(5))
        try:
            os.rename(workdir, renamed)
            workdir = renamed
        except OSError:
            pass
        else:
            if _reusable(workdir):
                return workdir
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=_prefix(pid), dir=_base()))
    (workdir / "artifacts").mkdir()
    return workdir


def _prefix(pid: int) -> str:
    return f"jobsite-run-{pid}-"


def _base() -> Path:
    """Where scratch directories go: JOBSITE_WORK_DIR, else the system's temp dir."""
    return Path(settings.JOBSITE_WORK_DIR or tempfile.gettempdir())


def give_back(workdir: Path) -> None:
    """The run is over: keep `workdir` for this process's next run if the
    run left nothing in it, else remove it."""
    pid = os.getpid()
    if not _reusable(workdir) or _kept.setdefault(pid, workdir) is not workdir:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    if pid not in _exit_hooks:
        # multiprocessing runs these when a worker process ends (and atexit
        # in the main process); a forked child starts with none.
        util.Finalize(None, _remove_kept, args=(pid,), exitpriority=0)
        _exit_hooks.add(pid)


def _remove_kept(pid: int) -> None:
    workdir = _kept.pop(pid, None) if os.getpid() == pid else None
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _reusable(workdir: Path) -> bool:
    """The run left `workdir` as take() made it: private to this user (0700,
    as mkdtemp makes it), holding only an empty artifacts/; both real
    directories, not links to somewhere else."""
    try:
        top = os.lstat(workdir)
        if not stat.S_ISDIR(top.st_mode) or stat.S_IMODE(top.st_mode) != 0o700:
            return False
        if top.st_uid != os.getuid() or os.listdir(workdir) != ["artifacts"]:
            return False
        artifacts = workdir / "artifacts"
        return stat.S_ISDIR(os.lstat(artifacts).st_mode) and not os.listdir(artifacts)
    except OSError:
        return False
