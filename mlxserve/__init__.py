# Load the Celery app with Django, so @shared_task binds to it (cookiecutter-django).
from mlxserve.celery import app as celery_app

__all__ = ["celery_app"]
