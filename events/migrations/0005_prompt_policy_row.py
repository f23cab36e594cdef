from django.db import migrations


def create_policy(apps, schema_editor):
    apps.get_model("events", "PromptPolicy").objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("events", "0004_prompt_policy_fleet_counters")]

    operations = [migrations.RunPython(create_policy, migrations.RunPython.noop)]
