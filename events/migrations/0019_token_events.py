"""Token events in typed columns (``events_token``), the pairs they name (``events_channel``),
and ``events_history``: every stored event, whichever table holds it, as one read-only view.

The table of JSON events keeps its name (``events_event``) and its rows: nothing is moved,
token events stored before this migration are read from it as before.
"""

import django.db.models.deletion
from django.db import migrations, models

from events.schema import HISTORY_VIEW

TOKEN_TABLE = {
    "postgresql": [
        # Partitioned by time; every row goes to the default partition until time partitions
        # are made (events.partitions). Columns in alignment order: with a token of up to five
        # bytes a row is 88 bytes (24 of them the tuple header).
        'CREATE TABLE events_token (id uuid NOT NULL, generation_id uuid NOT NULL, "timestamp" bigint NOT NULL, '
        "ingested_at timestamp with time zone NOT NULL, logprob real NULL, seq integer NOT NULL, "
        'channel_id smallint NOT NULL, token text NOT NULL) PARTITION BY RANGE ("timestamp")',
        "CREATE TABLE events_token_default PARTITION OF events_token DEFAULT",
        "CREATE INDEX token_id ON events_token USING hash (id) WITH (fillfactor = 100)",
        'CREATE INDEX token_time ON events_token ("timestamp")',
        "CREATE INDEX token_generation ON events_token (generation_id)",
        'CREATE INDEX token_channel_time ON events_token (channel_id, "timestamp")',
    ],
    "sqlite": [
        'CREATE TABLE events_token (id char(32) NOT NULL, generation_id char(32) NOT NULL, "timestamp" bigint '
        "NOT NULL, ingested_at datetime NOT NULL, logprob real NULL, seq integer NOT NULL, channel_id smallint "
        "NOT NULL, token text NOT NULL)",
        "CREATE INDEX token_id ON events_token (id)",
        'CREATE INDEX token_time ON events_token ("timestamp")',
        "CREATE INDEX token_generation ON events_token (generation_id)",
        'CREATE INDEX token_channel_time ON events_token (channel_id, "timestamp")',
    ],
}

def _run(statements):
    def run(apps, schema_editor):
        sql = statements[schema_editor.connection.vendor]
        for statement in [sql] if isinstance(sql, str) else sql:
            schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):

    dependencies = [
        ("events", "0018_worker_hosts"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RenameModel("Event", "EventRecord"),
                migrations.AlterModelTable("eventrecord", "events_event"),
            ],
        ),
        migrations.CreateModel(
            name="Channel",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("source", models.CharField(max_length=200)),
                ("model", models.CharField(max_length=200)),
            ],
            options={
                "constraints": [models.UniqueConstraint(fields=("source", "model"), name="channel_key")],
            },
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="TokenEvent",
                    fields=[
                        ("id", models.UUIDField(primary_key=True, serialize=False)),
                        ("generation_id", models.UUIDField()),
                        ("timestamp", models.BigIntegerField()),
                        ("seq", models.IntegerField()),
                        ("token", models.TextField()),
                        ("logprob", models.FloatField(null=True)),
                        ("ingested_at", models.DateTimeField()),
                        (
                            "channel",
                            models.ForeignKey(
                                db_constraint=False,
                                on_delete=django.db.models.deletion.PROTECT,
                                related_name="+",
                                to="events.channel",
                            ),
                        ),
                    ],
                    options={"db_table": "events_token"},
                ),
            ],
            database_operations=[
                migrations.RunPython(_run(TOKEN_TABLE), _run({"postgresql": "DROP TABLE events_token", "sqlite": "DROP TABLE events_token"})),
            ],
        ),
        migrations.CreateModel(
            name="Event",
            fields=[
                ("id", models.UUIDField(primary_key=True, serialize=False)),
                ("type", models.CharField(max_length=32)),
                ("timestamp", models.BigIntegerField(help_text="When it happened, epoch milliseconds.")),
                ("source", models.CharField(max_length=200)),
                ("generation_id", models.UUIDField(blank=True, null=True)),
                ("seq", models.BigIntegerField()),
                ("model", models.CharField(blank=True, default="", max_length=200)),
                ("payload", models.JSONField()),
                ("ingested_at", models.DateTimeField()),
                ("token", models.TextField(null=True)),
                ("logprob", models.FloatField(null=True)),
            ],
            options={"db_table": "events_history", "ordering": ["-timestamp", "-seq"], "managed": False},
        ),
        migrations.RunPython(_run(HISTORY_VIEW), _run({"postgresql": "DROP VIEW events_history", "sqlite": "DROP VIEW events_history"})),
    ]
