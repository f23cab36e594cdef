"""The worker host: the worker runtime inside a Celery worker process (``worker``), Celery's
queues read without trusting them (``broker``) and the services that keep workers running
(``service_files``, written by ``python -m mlxserve.service``). Nothing of the web side."""
