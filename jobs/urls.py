from __future__ import annotations

from django.urls import path

from jobs import views

urlpatterns = [
    path("", views.overview, name="jobs-overview"),
    path("stale/", views.stale, name="jobs-stale"),
    path("failures/", views.failures, name="jobs-failures"),
    path("jobs/<slug:slug>/", views.job_detail, name="jobs-job-detail"),
    path("jobs/<slug:slug>/run/", views.job_run, name="jobs-job-run"),
    path("jobs/<slug:slug>/backfill/<int:gap_id>/", views.job_backfill, name="jobs-job-backfill"),
    path("jobs/<slug:slug>/pause/", views.job_pause, name="jobs-job-pause"),
    path("jobs/<slug:slug>/resume/", views.job_resume, name="jobs-job-resume"),
    path("runs/<int:pk>/", views.run_detail, name="jobs-run-detail"),
    path("runs/<int:pk>/log/", views.run_log, name="jobs-run-log"),
    path("runs/<int:pk>/log/download/", views.run_log_download, name="jobs-run-log-download"),
    path(
        "runs/<int:run_id>/artifacts/<int:pk>/",
        views.artifact_download,
        name="jobs-artifact-download",
    ),
    path("runs/<int:pk>/rerun/", views.run_rerun, name="jobs-run-rerun"),
    path("runs/<int:pk>/cancel/", views.run_cancel, name="jobs-run-cancel"),
]
