# The control plane's /metrics reads the dead-letter total from a running total the ingester
# keeps (a scrape counted the whole table): it starts at the letters already stored.

from django.db import migrations


def start_the_total(apps, schema_editor):
    DeadLetter = apps.get_model("events", "DeadLetter")
    FleetCounter = apps.get_model("events", "FleetCounter")
    FleetCounter.objects.update_or_create(
        name="mlxserve_dead_letters_total", labels="{}", defaults={"value": float(DeadLetter.objects.count())}
    )


class Migration(migrations.Migration):

    dependencies = [
        ('events', '0016_registered_model_rules'),
    ]

    operations = [
        migrations.RunPython(start_the_total, migrations.RunPython.noop),
    ]
