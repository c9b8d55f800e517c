from django.db import migrations, models

ENDED_EXCLUDED = ("queued", "running", "skipped")


def backfill(apps, schema_editor):
    """Each job's latest ended run, one index probe per job."""
    Job = apps.get_model("jobs", "Job")
    Run = apps.get_model("jobs", "Run")
    for job_id in list(Job.objects.values_list("pk", flat=True)):
        latest = (
            Run.objects.filter(job_id=job_id)
            .exclude(status__in=ENDED_EXCLUDED)
            .order_by("-id")
            .values_list("id", "status")
            .first()
        )
        if latest:
            Job.objects.filter(pk=job_id).update(
                last_end_run_id=latest[0], last_end_status=latest[1]
            )


class Migration(migrations.Migration):
    dependencies = [("jobs", "0005_kinds_artifacts")]

    operations = [
        migrations.AddField(
            model_name="job",
            name="last_end_status",
            field=models.CharField(blank=True, editable=False, max_length=12),
        ),
        migrations.AddField(
            model_name="job",
            name="last_end_run_id",
            field=models.BigIntegerField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
