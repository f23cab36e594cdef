from django.db import migrations, models

DEFAULTS = {
    # Token events are the bulk: days. Lifecycle events are few and explain history: months.
    "tokenGenerated": 7,
    "generationStarted": 90,
    "generationCompleted": 90,
    "error": 90,
    "runtimeStatus": 30,
    "modelLoaded": 180,
    "modelUnloaded": 180,
    "modelInvalidated": 180,
}


def create_defaults(apps, schema_editor):
    policy = apps.get_model("events", "RetentionPolicy")
    for event_type, keep_days in DEFAULTS.items():
        policy.objects.get_or_create(event_type=event_type, defaults={"keep_days": keep_days})


class Migration(migrations.Migration):
    dependencies = [("events", "0002_generations_workers_registry")]

    operations = [
        migrations.AddField(
            model_name="deadletter",
            name="replayed_at",
            field=models.DateTimeField(blank=True, help_text="When a replay stored it as an event.", null=True),
        ),
        migrations.CreateModel(
            name="RetentionPolicy",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("event_type", models.CharField(choices=[("modelLoaded", "modelLoaded"), ("modelUnloaded", "modelUnloaded"), ("modelInvalidated", "modelInvalidated"), ("generationStarted", "generationStarted"), ("tokenGenerated", "tokenGenerated"), ("generationCompleted", "generationCompleted"), ("error", "error"), ("runtimeStatus", "runtimeStatus")], max_length=32, unique=True)),
                ("keep_days", models.PositiveIntegerField(help_text="Events older than this many days are deleted.")),
            ],
            options={"ordering": ["event_type"], "verbose_name_plural": "retention policies"},
        ),
        migrations.RunPython(create_defaults, migrations.RunPython.noop),
    ]
