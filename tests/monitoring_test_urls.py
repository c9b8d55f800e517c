"""The site's URLs with jobs.monitoring_urls in front, until jobsite/urls.py includes it."""

from __future__ import annotations

from django.urls import include, path

from jobsite.urls import urlpatterns as site_urlpatterns

urlpatterns = [path("", include("jobs.monitoring_urls")), *site_urlpatterns]
