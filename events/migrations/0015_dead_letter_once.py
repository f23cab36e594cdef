# One dead letter per item of a stream entry: letters written again by a redelivery (a commit
# that succeeded before a failed XACK, an entry claimed by a second ingester) are removed, the
# first of each kept, before the key is made unique.

from django.db import migrations, models
from django.db.models import Count, Min


def drop_repeats(apps, schema_editor):
    DeadLetter = apps.get_model("events", "DeadLetter")
    repeated = (
        DeadLetter.objects.values("stream_id").annotate(n=Count("id"), first=Min("id")).filter(n__gt=1)
    )
    for row in repeated.iterator(chunk_size=500):
        DeadLetter.objects.filter(stream_id=row["stream_id"]).exclude(id=row["first"]).delete()


class Migration(migrations.Migration):

    dependencies = [
        ('events', '0014_retention_bound'),
    ]

    operations = [
        migrations.RunPython(drop_repeats, migrations.RunPython.noop),
        migrations.AlterField(
            model_name='deadletter',
            name='stream_id',
            field=models.CharField(help_text='The Redis stream entry id (#n: the n-th envelope of a batch entry; @i: its i-th field). One letter per item of an entry, however often the entry is delivered.', max_length=64, unique=True),
        ),
    ]
