from django.db import migrations


def create_config(apps, schema_editor):
    # The one config row exists from the start: the admin page and the API never find it missing.
    apps.get_model("telemetry", "TelemetryConfig").objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("telemetry", "0001_initial")]

    operations = [migrations.RunPython(create_config, migrations.RunPython.noop)]
