import os

from celery import Celery

from mlxserve.host import broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

broker.install()  # a worker reads its queues without trusting them
app = Celery("mlxserve")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
