import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mlxserve.settings")

application = get_wsgi_application()

from mlxserve.web.production import production_keys_require  # noqa: E402  (needs the settings loaded)

production_keys_require("web server")
