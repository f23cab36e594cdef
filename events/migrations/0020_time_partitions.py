"""The JSON events table partitioned by time on PostgreSQL, its key ``(id, timestamp)`` on both
databases; the first partitions of both event tables made.

On PostgreSQL the rows already stored are not moved: the table becomes the partition of the time
before (``events_event_before``, from the beginning of time to the first week boundary past
tomorrow), attached without a scan or an index build under lock. Its unique index on ``(id,
timestamp)`` is built first, CONCURRENTLY (the ingester goes on storing), and a CHECK constraint
proves its rows belong where it is attached (validated without blocking writes). Then, in one
short transaction, it is renamed, the partitioned table made in its place and it attached. See
docs/operations.md, "Upgrading to partitioned events", for what this costs on a large table.

On SQLite the table is rebuilt with its new key (development databases are small).
"""

import time

from django.db import migrations

from events.schema import HISTORY_VIEW

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
INDEXES = {
    "event_time_seq": '("timestamp" DESC, seq DESC)',
    "event_type_time_seq": '(type, "timestamp" DESC, seq DESC)',
    "event_model_time_seq": '(model, "timestamp" DESC, seq DESC)',
    "event_source_time_seq": '(source, "timestamp" DESC, seq DESC)',
    "event_generation_time_seq": '(generation_id, "timestamp" DESC, seq DESC)',
}
SQLITE_TABLE = (
    'CREATE TABLE "{name}" ("id" char(32) NOT NULL, "type" varchar(32) NOT NULL, "timestamp" bigint NOT NULL, '
    '"source" varchar(200) NOT NULL, "generation_id" char(32) NULL, "seq" bigint NOT NULL, "model" varchar(200) '
    'NOT NULL, "payload" text NOT NULL CHECK ((JSON_VALID("payload") OR "payload" IS NULL)), "ingested_at" '
    'datetime NOT NULL, PRIMARY KEY ({key}))'
)
COLUMNS = "id, type, timestamp, source, generation_id, seq, model, payload, ingested_at"


def _first_partition(now_ms):
    """The first week boundary at least a day away: rows stored until the switch belong before it."""
    return -(-(now_ms + DAY_MS) // WEEK_MS) * WEEK_MS


def _postgresql_forward(cursor):
    bound = _first_partition(time.time_ns() // 1_000_000)
    cursor.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS event_before_key ON events_event (id, timestamp)")
    cursor.execute("ALTER TABLE events_event DROP CONSTRAINT IF EXISTS event_before_bound")  # a run cut short
    cursor.execute(
        f"ALTER TABLE events_event ADD CONSTRAINT event_before_bound CHECK (timestamp < {bound}) NOT VALID"
    )
    cursor.execute("ALTER TABLE events_event VALIDATE CONSTRAINT event_before_bound")
    cursor.execute("BEGIN")
    cursor.execute("LOCK TABLE events_event IN ACCESS EXCLUSIVE MODE")
    cursor.execute("DROP VIEW events_history")
    cursor.execute("ALTER TABLE events_event RENAME TO events_event_before")
    for name in INDEXES:
        cursor.execute(f"ALTER INDEX {name} RENAME TO {name.replace('event_', 'event_before_', 1)}")
    # Its key becomes (id, timestamp), the index built above: no build under the lock.
    cursor.execute(
        "ALTER TABLE events_event_before DROP CONSTRAINT events_event_pkey, "
        "ADD CONSTRAINT events_event_before_pkey PRIMARY KEY USING INDEX event_before_key"
    )
    cursor.execute(
        'CREATE TABLE events_event (LIKE events_event_before INCLUDING DEFAULTS) PARTITION BY RANGE ("timestamp")'
    )
    cursor.execute("ALTER TABLE events_event ADD PRIMARY KEY (id, timestamp)")
    for name, columns in INDEXES.items():
        cursor.execute(f"CREATE INDEX {name} ON events_event {columns}")
    # The indexes and the key found on the partition as they are (no build), its rows proven by
    # the CHECK constraint (no scan).
    cursor.execute(f"ALTER TABLE events_event ATTACH PARTITION events_event_before FOR VALUES FROM (MINVALUE) TO ({bound})")
    cursor.execute("CREATE TABLE events_event_default PARTITION OF events_event DEFAULT")
    cursor.execute(HISTORY_VIEW["postgresql"])
    cursor.execute("COMMIT")
    _partitions_first(cursor, bound)


def _partitions_first(cursor, events_from):
    """Today's and the next two days' partitions of token events; the JSON events' weeks from
    ``events_from`` to two days ahead. The ingester makes the later ones (events.partitions)."""
    now = time.time_ns() // 1_000_000
    for table, width, start in (
        ("events_token", DAY_MS, now - now % DAY_MS),
        ("events_event", WEEK_MS, events_from),
    ):
        for lower in range(start, now + 2 * DAY_MS + 1, width):
            name = f"{table}_{time.strftime('%Y%m%d', time.gmtime(lower / 1000))}"
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lower}) TO ({lower + width})"
            )


def _postgresql_backward(cursor):
    cursor.execute("BEGIN")
    cursor.execute("DROP VIEW events_history")
    cursor.execute("CREATE TABLE events_event_plain (LIKE events_event INCLUDING DEFAULTS)")
    cursor.execute(f"INSERT INTO events_event_plain ({COLUMNS}) SELECT {COLUMNS} FROM events_event")
    cursor.execute("DROP TABLE events_event")
    cursor.execute("ALTER TABLE events_event_plain RENAME TO events_event")
    cursor.execute("ALTER TABLE events_event ADD PRIMARY KEY (id)")
    for name, columns in INDEXES.items():
        cursor.execute(f"CREATE INDEX {name} ON events_event {columns}")
    cursor.execute(HISTORY_VIEW["postgresql"])
    cursor.execute("COMMIT")
    # Token partitions are left: 0019's table is partitioned as it is.


def _sqlite_rebuild(cursor, key):
    cursor.execute("DROP VIEW events_history")
    cursor.execute(SQLITE_TABLE.format(name="events_event_new", key=key))
    cursor.execute(f"INSERT INTO events_event_new ({COLUMNS}) SELECT {COLUMNS} FROM events_event")
    cursor.execute("DROP TABLE events_event")
    cursor.execute("ALTER TABLE events_event_new RENAME TO events_event")
    for name, columns in INDEXES.items():
        cursor.execute(f"CREATE INDEX {name} ON events_event {columns}")
    cursor.execute(HISTORY_VIEW["sqlite"])


def forward(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        if schema_editor.connection.vendor == "postgresql":
            _postgresql_forward(cursor)
        else:
            _sqlite_rebuild(cursor, '"id", "timestamp"')


def backward(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        if schema_editor.connection.vendor == "postgresql":
            _postgresql_backward(cursor)
        else:
            _sqlite_rebuild(cursor, '"id"')


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run in a transaction: the switch makes its own.
    atomic = False

    dependencies = [
        ("events", "0019_token_events"),
    ]

    operations = [migrations.RunPython(forward, backward)]
