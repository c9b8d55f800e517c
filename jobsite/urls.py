from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

# Django's auth URLs but the password reset by email: that is a page any
# visitor can use to make the server send mail. An admin manages users, and
# `manage.py changepassword` resets a password.
accounts = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password_change/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path(
        "password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
]

urlpatterns = [
    # Browsers ask for /favicon.ico on pages that name no icon (the admin's):
    # without this every first visit logged a 404 warning.
    path("favicon.ico", RedirectView.as_view(url=static("jobs/favicon.svg"), permanent=True)),
    path("admin/", admin.site.urls),
    path("accounts/", include(accounts)),
    path("", include("jobs.monitoring_urls")),  # /health/, /metrics
    path("", include("jobs.urls")),
]
