"""/health/ and /metrics: included by jobsite/urls.py ahead of jobs.urls."""

from __future__ import annotations

from django.urls import path

from jobs import monitoring

urlpatterns = [
    path("health/", monitoring.health, name="jobs-health"),
    # No trailing slash: Prometheus scrapes /metrics by default.
    path("metrics", monitoring.metrics, name="jobs-metrics"),
]
