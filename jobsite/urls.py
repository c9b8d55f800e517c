from __future__ import annotations

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    # Browsers ask for /favicon.ico on pages that name no icon (the admin's):
    # without this every first visit logged a 404 warning.
    path("favicon.ico", RedirectView.as_view(url=static("jobs/favicon.svg"), permanent=True)),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("jobs.monitoring_urls")),  # /health/, /metrics
    path("", include("jobs.urls")),
]
