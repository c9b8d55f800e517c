from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse


def health(request: HttpRequest) -> JsonResponse:
    try:
        connection.ensure_connection()
        ok = True
    except Exception:
        ok = False
    return JsonResponse({"database": ok}, status=200 if ok else 503)


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    return HttpResponse("overview")


@login_required
def job_detail(request: HttpRequest, slug: str) -> HttpResponse:
    return HttpResponse(slug)


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return HttpResponse(str(pk))
