import time

from django.db import migrations, models

HOUR_MS = 3_600_000
AHEAD_MS = 10 * 60 * 1000  # mlxserve.contract.events.TIMESTAMP_MAX_AHEAD_MS when this was written


def minutes_start(apps, schema_editor):
    """Minute and day rollups hold every event from the first hour no stored event can reach (as the
    hourly ones did when they came, 0012); earlier minutes are counted from the events until
    ``rollup_events`` builds theirs. With no event stored, every minute is covered."""
    StatsCoverage = apps.get_model("events", "StatsCoverage")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM events_event) OR EXISTS (SELECT 1 FROM events_token)"
        )
        stored = bool(cursor.fetchone()[0])
    minutes_from = 0
    if stored:
        ahead = time.time_ns() // 1_000_000 + AHEAD_MS
        minutes_from = (ahead // HOUR_MS + 1) * HOUR_MS
    StatsCoverage.objects.update_or_create(pk=1, defaults={"minutes_from": minutes_from})


class Migration(migrations.Migration):

    dependencies = [
        ('events', '0020_time_partitions'),
    ]

    operations = [
        migrations.AddField(
            model_name='statscoverage',
            name='minutes_from',
            field=models.BigIntegerField(default=0, help_text="An hour's start, epoch milliseconds: minute and day rollups from here on."),
        ),
        migrations.CreateModel(
            name='StatsDay',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('model', models.CharField(blank=True, default='', max_length=200)),
                ('series', models.CharField(max_length=48)),
                ('bucket', models.SmallIntegerField(default=0)),
                ('count', models.BigIntegerField(default=0)),
                ('day', models.BigIntegerField(help_text="The day's start (UTC), epoch milliseconds.")),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('day', 'model', 'series', 'bucket'), name='stats_day_key')],
            },
        ),
        migrations.CreateModel(
            name='StatsMinute',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('model', models.CharField(blank=True, default='', max_length=200)),
                ('series', models.CharField(max_length=48)),
                ('bucket', models.SmallIntegerField(default=0)),
                ('count', models.BigIntegerField(default=0)),
                ('minute', models.BigIntegerField(help_text="The minute's start, epoch milliseconds.")),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('minute', 'model', 'series', 'bucket'), name='stats_minute_key')],
            },
        ),
        migrations.RunPython(minutes_start, migrations.RunPython.noop),
    ]
