"""mlxserve: the project package.

``mlxserve.contract`` (the wire contract) and ``mlxserve.engine`` (the worker) load neither
Django nor Celery; the rest of this package is the Django project (settings, urls, wsgi) and
the Celery app (``mlxserve.celery``, found by ``celery -A mlxserve``, loaded with Django by
the events app so tasks bind to it).
"""
