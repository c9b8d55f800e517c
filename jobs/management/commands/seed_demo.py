"""manage.py seed_demo: a demo superuser and a few demo jobs (idempotent)."""

from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from jobs.jobfile import jobs_load

DEMO_USERNAME = "admin"
DEFAULT_DEMO_PASSWORD = "jobsite-demo"
DEMO_JOBS = Path(__file__).resolve().parents[2] / "demo_jobs.toml"


class Command(BaseCommand):
    help = (
        "Create the demo superuser (password from JOBSITE_DEMO_PASSWORD) unless it "
        "exists, and load the demo jobs. Safe to run again."
    )

    def handle(self, *args, **options) -> None:
        User = get_user_model()
        url = settings.SITE_URL + "/"
        if User.objects.filter(username=DEMO_USERNAME).exists():
            self.stdout.write(
                f'Demo user "{DEMO_USERNAME}" already exists (password not changed). '
                f"Log in at {url}"
            )
        else:
            password = os.environ.get("JOBSITE_DEMO_PASSWORD") or DEFAULT_DEMO_PASSWORD
            User.objects.create_superuser(DEMO_USERNAME, "admin@example.com", password)
            self.stdout.write(
                f"Created the demo superuser. Log in at {url}\n"
                f"  username: {DEMO_USERNAME}\n"
                f"  password: {password}"
            )
        self.stdout.write(jobs_load(path=DEMO_JOBS, prune=False).summary())
