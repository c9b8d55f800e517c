from __future__ import annotations

from django.urls import path

from jobs import views

urlpatterns = [
    path("", views.overview, name="jobs-overview"),
    path("health/", views.health, name="jobs-health"),
    path("jobs/<slug:slug>/", views.job_detail, name="jobs-job-detail"),
    path("runs/<int:pk>/", views.run_detail, name="jobs-run-detail"),
]
