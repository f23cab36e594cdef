from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "events"
    verbose_name = "Events"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        import mlxserve.celery
        import mlxserve.web.production  # noqa: F401  (registers its deploy check)
        from events.metrics import register
        from mlxserve.web.roles import roles_ensure

        register()
        post_migrate.connect(roles_ensure, sender=self)
