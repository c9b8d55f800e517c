"""Shared fixtures: small factories, no JSON fixtures."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection

from jobs.models import Job

_names = itertools.count(1)


@pytest.fixture
def make_job(db):
    def make(**fields) -> Job:
        n = next(_names)
        fields.setdefault("name", f"job-{n}")
        fields.setdefault("slug", fields["name"].lower().replace(" ", "-"))
        fields.setdefault("command", "echo hello")
        fields.setdefault("timeout", 30)
        job = Job(**fields)
        job.full_clean()
        job.save()
        return job

    return make


@pytest.fixture
def make_user(db):
    def make(username: str = "", *, superuser: bool = False, perms: tuple[str, ...] = ()) -> User:
        username = username or f"user{next(_names)}"
        if superuser:
            return User.objects.create_superuser(username, f"{username}@example.com", "pw-secret-1")
        user = User.objects.create_user(username, f"{username}@example.com", "pw-secret-1")
        user.is_staff = True
        user.save()
        for perm in perms:
            app, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app, codename=codename)
            )
        return user

    return make


@pytest.fixture
def admin_client(client, make_user):
    client.force_login(make_user("boss", superuser=True))
    return client


@pytest.fixture
def q_sync():
    """Run django-q2 tasks inline (Q_CLUSTER is read once at import, so
    switch Conf, not settings)."""
    from django_q.conf import Conf

    old = Conf.SYNC
    Conf.SYNC = True
    yield
    Conf.SYNC = old


def database_url_for_children() -> str:
    """A DATABASE_URL that points child processes at the test database."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgres://{s['USER']}{password}@{host}:{port}/{s['NAME']}"


def chromium_path() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )


requires_postgres = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
    reason="needs PostgreSQL: set DATABASE_URL=postgres://... (CI does)",
)
