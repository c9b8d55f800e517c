"""Files a run produced: collected from its $JOBSITE_ARTIFACTS_DIR into the
default storage when it ends; deleted with the run."""

from __future__ import annotations

from pathlib import Path

from django.core.files import File
from django.utils import timezone

from jobs.models import Artifact, Run


def collect(run: Run, directory: Path) -> list[Artifact]:
    """Store every regular file below `directory` as an artifact of `run`."""
    stored = []
    if not directory.is_dir():
        return stored
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        name = str(path.relative_to(directory))
        artifact = Artifact(run=run, name=name, size=path.stat().st_size, created_at=timezone.now())
        with path.open("rb") as fh:
            artifact.file.save(path.name, File(fh), save=False)
        artifact.save()
        stored.append(artifact)
    return stored


def delete_files(runs) -> int:
    """Remove the stored files of these runs' artifacts (before the runs go)."""
    count = 0
    for artifact in Artifact.objects.filter(run__in=runs).only("file"):
        artifact.file.delete(save=False)
        count += 1
    return count
