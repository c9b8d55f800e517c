from __future__ import annotations

import gc
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "jobsite.settings")

application = get_wsgi_application()


def _freeze_startup_objects() -> None:
    """Load the URLconf (every view, the admin, the models), then move what
    is alive to the collector's permanent generation (gc.freeze).

    Each web worker holds a few hundred thousand long-lived objects. Python's
    full collection walks all of them: 45-60 ms, landing on every twentieth
    or so request of a page that builds 1,000 jobs, and so on its p95
    (measured on `/` with 2 M runs, docs/PERFORMANCE.md). Frozen objects are
    never freed, which is what they are anyway: they live as long as the worker.
    """
    from django.template import engines
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports the URLconf
    engines.all()
    gc.collect()
    gc.freeze()


_freeze_startup_objects()
