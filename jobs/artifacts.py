"""Files a run produced: collected from its $JOBSITE_ARTIFACTS_DIR into the
default storage when it ends; deleted with the run."""

from __future__ import annotations

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
