"""Files a run produced: collected from its $JOBSITE_ARTIFACTS_DIR into the
default storage when it ends; deleted with the run."""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import stat
from collections.abc import Callable
from pathlib import Path

from django.core.files import File
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from jobs.models import Artifact, Run

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_LENGTH = Artifact._meta.get_field("name").max_length
ROOT = "artifacts"  # models._artifact_path: artifacts/<job slug>/<run id>/<file>


def collect(
    run: Run, directory: Path, *, note: Callable[[str], None] = lambda line: None
) -> list[Artifact]:
    """Store every regular file below `directory` as an artifact of `run`.

    The directory is the job's to change: a symlink in its place, or in
    place of a file or directory below it, is not followed (it could point
    at any file the worker may read)."""
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(mode):
        note("[jobsite] $JOBSITE_ARTIFACTS_DIR is no longer a directory: no files collected")
        return []
    stored = []
    taken: set[str] = set()
    for path in _regular_files(directory):
        name = _unique(_display_name(path.relative_to(directory)), taken)
        stored.append(_store(run, path, name))
    return stored


def _regular_files(directory: Path) -> list[Path]:
    found = []
    for root, _dirs, files in os.walk(directory):  # never into a linked directory
        for file in files:
            path = Path(root) / file
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return sorted(found)


def _store(run: Run, path: Path, name: str) -> Artifact:
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
        artifact = Artifact(
            run=run, name=name, size=os.fstat(fh.fileno()).st_size, created_at=timezone.now()
        )
        artifact.file.save(_storage_name(path), File(fh), save=False)
    artifact.save()
    return artifact


def _display_name(relative: Path) -> str:
    """The name as the job wrote it, for the page, the download and the
    upload; bytes that are not UTF-8 shown as U+FFFD, a path too long for
    the column cut from the front (the file's own name matters most)."""
    name = os.fsencode(relative).decode("utf-8", errors="replace")
    return name if len(name) <= NAME_LENGTH else "…" + name[-(NAME_LENGTH - 1) :]


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or "name (2).ext" if two files' names read the same (both
    not UTF-8, or both cut)."""
    root, ext = posixpath.splitext(name)
    number = 1
    while name in taken:
        number += 1
        name = f"{root[: NAME_LENGTH - len(ext) - 10]} ({number}){ext}"
    taken.add(name)
    return name


def _storage_name(path: Path) -> str:
    """A name every storage takes: Django's refuses "@@@" or "€" outright.
    Artifact.name keeps the real one."""
    if PLAIN_NAME.fullmatch(path.name):
        return path.name
    extension = path.suffix[1:]
    return f"file.{extension}" if PLAIN_NAME.fullmatch(extension) else "file"


def delete_files(runs) -> int:
    """Remove the stored files of these runs' artifacts (before the runs go)."""
    count = 0
    for artifact in Artifact.objects.filter(run__in=runs).only("file"):
        artifact.file.delete(save=False)
        count += 1
    return count


def delete_files_on_commit(artifacts: QuerySet[Artifact]) -> None:
    """Remove these artifacts' stored files once the transaction that deletes
    their rows commits (a rollback keeps both): deleting a job or a run
    cascades to the rows only. Call it inside that transaction."""
    storage = Artifact._meta.get_field("file").storage
    names = [name for name in artifacts.values_list("file", flat=True) if name]

    def delete() -> None:
        for name in names:
            storage.delete(name)

    transaction.on_commit(delete)


def delete_orphaned_files(*, batch: int = 500) -> int:
    """Remove the stored files of runs that no longer exist; returns how many.

    Deleting jobs and runs through services.jobs_delete / runs_delete (the
    admin, loadjobs --prune) and retention.prune_runs removes their files.
    A deletion made another way (job.delete() or a queryset's delete() in
    `manage.py shell`, and the cascade from it) removes only rows: nothing
    hooks save() or signals. Files are stored as artifacts/<slug>/<run id>/,
    and a run id is never used again (AUTOINCREMENT on SQLite, a sequence
    on PostgreSQL), so a run id directory whose run is gone holds nothing
    anyone can reach. Other directories and files are left alone.
    """
    storage = Artifact._meta.get_field("file").storage
    found = [
        (run_id, f"{ROOT}/{slug}/{name}")
        for slug in _listdir(storage, ROOT)[0]
        for name in _listdir(storage, f"{ROOT}/{slug}")[0]
        if name.isdigit() and (run_id := int(name)) > 0
    ]
    count = 0
    for start in range(0, len(found), batch):
        chunk = dict(found[start : start + batch])
        alive = set(Run.objects.filter(pk__in=chunk).values_list("pk", flat=True))
        for run_id, directory in chunk.items():
            if run_id not in alive:
                count += _delete_tree(storage, directory)
    return count


def _listdir(storage, path: str) -> tuple[list[str], list[str]]:
    try:
        return storage.listdir(path)
    except FileNotFoundError:
        return [], []


def _delete_tree(storage, directory: str) -> int:
    """Delete the files below `directory`, then the directory (a storage
    without directories has nothing more to delete)."""
    dirs, files = _listdir(storage, directory)
    count = sum(_delete_tree(storage, f"{directory}/{name}") for name in dirs)
    for name in files:
        storage.delete(f"{directory}/{name}")
        count += 1
    with contextlib.suppress(OSError, NotImplementedError):
        storage.delete(directory)
    return count
