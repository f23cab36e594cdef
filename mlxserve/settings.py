"""Settings, read from the environment.

The defaults run a checkout with nothing but Redis: SQLite in ``var/``, a
secret key generated once into ``var/``. Production differs only by
environment variables; every one is listed in the README.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


VAR_DIR = Path(env_str("MLXSERVE_VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


# Keys read from a file this host made, by environment variable: web server and ingester
# refuse to start on them with DEBUG off (``mlxserve.web.production``).
HOST_MADE_KEYS: dict[str, str] = {}


def _key(name: str, file_name: str) -> str:
    key = os.environ.get(name)
    if key:
        return key
    # A checkout must run without set-up (`make run` exports these files' keys to the
    # processes it starts), and sessions must survive a restart: one key, kept in var/.
    key_file = VAR_DIR / file_name
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(secrets.token_urlsafe(50))
    HOST_MADE_KEYS[name] = key_file.read_text().strip()
    return HOST_MADE_KEYS[name]


SECRET_KEY = _key("SECRET_KEY", "secret-key")
# Keys the hmac-sha256 of prompts kept under the "hash" policy: its own key, so rotating
# SECRET_KEY (sessions) does not change the hashes, and equal prompts match across hosts.
PROMPT_HASH_KEY = _key("MLXSERVE_PROMPT_HASH_KEY", "prompt-hash-key")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Behind TLS (all off by default, so `make run` works over plain http on localhost).
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("MLXSERVE_SECURE_COOKIES", False)
SECURE_SSL_REDIRECT = env_bool("MLXSERVE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("MLXSERVE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("MLXSERVE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("MLXSERVE_HSTS_PRELOAD", False)


def _proxy_ssl_header(value: str) -> tuple[str, str] | None:
    """``HTTP_X_FORWARDED_PROTO=https``: the header a TLS-terminating proxy sets, and its value."""
    if not value:
        return None
    header, _, expected = value.partition("=")
    if not header.startswith("HTTP_") or not expected:
        raise ImproperlyConfigured(
            f"MLXSERVE_PROXY_SSL_HEADER must look like HTTP_X_FORWARDED_PROTO=https, got {value!r}"
        )
    return header, expected


# Only behind a proxy that sets (and strips from clients) this header.
SECURE_PROXY_SSL_HEADER = _proxy_ssl_header(env_str("MLXSERVE_PROXY_SSL_HEADER", ""))

INSTALLED_APPS = [
    "mlxserve.web.admin.MlxserveAdminConfig",  # django.contrib.admin, named after the deployment
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "telemetry",
    "events",
    "serving",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "mlxserve.web.static_files.StaticFilesMiddleware",
    "mlxserve.web.api.RequestSizeLimitMiddleware",
    "mlxserve.web.api.NulParameterMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "mlxserve.urls"
WSGI_APPLICATION = "mlxserve.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the ingester write at once: WAL lets readers go on
    # while one writes, IMMEDIATE takes the write lock up front instead of
    # failing with "database is locked" half-way through a transaction.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}
# The threads a web process serves the API, the admin and /metrics on (mlxserve.asgi; /v1/ runs on
# the event loop): each holds at most one database connection during a request.
WEB_THREADS = env_int("MLXSERVE_WEB_THREADS", 8)
if not 1 <= WEB_THREADS <= 256:
    raise ImproperlyConfigured(f"MLXSERVE_WEB_THREADS must be 1 to 256, got {WEB_THREADS}")
DB_POOL_SIZE = env_int("MLXSERVE_DB_POOL_SIZE", 10)
if DB_POOL_SIZE < 0:
    raise ImproperlyConfigured(f"MLXSERVE_DB_POOL_SIZE must be 0 or more, got {DB_POOL_SIZE}")
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and 0 < DB_POOL_SIZE <= WEB_THREADS:
    # A thread waiting for a connection would wait out the pool's timeout and fail the request.
    raise ImproperlyConfigured(
        f"MLXSERVE_DB_POOL_SIZE ({DB_POOL_SIZE}) must be more than MLXSERVE_WEB_THREADS ({WEB_THREADS}):"
        " a connection for each thread and one for /v1/"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DB_POOL_SIZE:
    # The web server's requests run on its threads and /v1/'s on the thread Django's ASGI handler
    # keeps for sync work: as Django advises for ASGI, no persistent connections but psycopg's
    # pool, per process; MLXSERVE_DB_POOL_SIZE=0 goes back to DATABASE_CONN_MAX_AGE.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DB_POOL_SIZE,
        "timeout": 10,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # The API's queries are small and indexed: two parallel workers started for one cost 5-6 ms of
    # the 12 ms a generation's page took at 30 million events. 0 by default; a deployment that
    # runs big reports on this database can raise it.
    parallel = env_int("MLXSERVE_DB_PARALLEL_WORKERS", 0)
    if not 0 <= parallel <= 64:
        raise ImproperlyConfigured(f"MLXSERVE_DB_PARALLEL_WORKERS must be 0 to 64, got {parallel}")
    options = DATABASES["default"].setdefault("OPTIONS", {})
    # force_generic_plan applies to prepared statements only. The ORM prepares none (client-side
    # binding); events.history prepares the reads that no time bound prunes (a generation's rows),
    # whose planning over every daily partition cost more than running them.
    # jit=off: the planner's estimate for the admin's event list (the view of both tables, newest
    # first) at 30 million events passed jit_optimize_above_cost, and compiling it took a second;
    # the query ran in one millisecond. No query of the project's is long enough to gain by it.
    options["options"] = (
        f"-c max_parallel_workers_per_gather={parallel} -c plan_cache_mode=force_generic_plan -c jit=off"
    )
    # Statements are prepared only when asked to (prepare=True): never after N runs of one query.
    options["prepare_threshold"] = 2**31 - 1
if DATABASES["default"]["ENGINE"] in ("django.db.backends.postgresql", "django.db.backends.sqlite3"):
    # django-prometheus's wrappers of the same backends: queries, errors and new
    # connections by database on /metrics.
    DATABASES["default"]["ENGINE"] = DATABASES["default"]["ENGINE"].replace(
        "django.db.backends.", "django_prometheus.db.backends."
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Serve the admin's files straight from the apps: no collectstatic step to forget.
SERVESTATIC_USE_FINDERS = True

# -- the API --------------------------------------------------------------------

# Requests over this size get 413, their body never parsed.
MAX_REQUEST_BYTES = env_int("MLXSERVE_MAX_REQUEST_BYTES", 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
# A body over the limit is still read (up to this many bytes) and thrown away before the
# 413 goes out, so the client gets the answer rather than a connection reset.
REQUEST_DRAIN_BYTES = env_int("MLXSERVE_REQUEST_DRAIN_BYTES", 16 * 1024 * 1024)

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header is what turns "not logged in"
    # into 401 rather than 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["mlxserve.web.api.CanRead"],
    "DEFAULT_PARSER_CLASSES": ["mlxserve.web.api.StrictJSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "mlxserve.web.api.FastJSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "mlxserve.web.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "mlxserve.web.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # No ?format=: the API speaks JSON (and the export NDJSON); an unknown format was a 404.
    "URL_FORMAT_OVERRIDE": None,
    "DEFAULT_THROTTLE_CLASSES": ["mlxserve.web.api.PostRateThrottle"],
}
# Migration gauges would be one series per process in multiprocess mode; `make run`
# migrates before it starts, so they say nothing useful.
PROMETHEUS_EXPORT_MIGRATIONS = False

# Writes (POST/PUT/PATCH) per account; one request may carry a batch of events.
# Empty turns throttling off.
API_POST_RATE = env_str("MLXSERVE_API_POST_RATE", "1200/min")
# Events each account may post over the API, across every web process ("" turns it off).
PRODUCER_EVENT_RATE = env_str("MLXSERVE_PRODUCER_EVENT_RATE", "60000/min")
if PRODUCER_EVENT_RATE and not re.fullmatch(r"\d+/(s|sec|m|min|h|hour|d|day)", PRODUCER_EVENT_RATE):
    raise ImproperlyConfigured(
        f"MLXSERVE_PRODUCER_EVENT_RATE must be N/s, N/min, N/hour or N/day, got {PRODUCER_EVENT_RATE!r}"
    )
# Past this many stream entries not yet stored, posts get 503 instead of filling Redis (0: no limit).
STREAM_BACKLOG_LIMIT = env_int("MLXSERVE_STREAM_BACKLOG_LIMIT", 100_000)
# ...and bytes of stream in Redis (sampled MEMORY USAGE): entries alone do not bound memory.
STREAM_BACKLOG_BYTES = env_int("MLXSERVE_STREAM_BACKLOG_BYTES", 256 * 1024 * 1024)
# Distinct sources one producer account may post as (``N/...``), over MLXSERVE_WORKER_FORGET_AFTER:
# what one account can make grow (worker rows, series, admin pages) is bounded.
SOURCES_PER_PRODUCER = env_int("MLXSERVE_SOURCES_PER_PRODUCER", 100)
# A worker not heard from for this many seconds is forgotten (its row deleted by the hourly pass);
# it comes back with its next event.
WORKER_FORGET_AFTER_S = env_int("MLXSERVE_WORKER_FORGET_AFTER", 7 * 86400)
# (source, model) pairs the ingester gives a channel (a 16-bit id of the compact token rows) per host
# or producer (a source's first part): one compromised host cannot use up the 32,767 ids; the tokens
# of the pairs past it are stored as JSON rows, whole and readable the same way.
CHANNELS_PER_PRODUCER = env_int("MLXSERVE_CHANNELS_PER_PRODUCER", 1000)
if SOURCES_PER_PRODUCER < 1 or WORKER_FORGET_AFTER_S < 60 or CHANNELS_PER_PRODUCER < 1:
    raise ImproperlyConfigured(
        "MLXSERVE_SOURCES_PER_PRODUCER and MLXSERVE_CHANNELS_PER_PRODUCER must be at least 1, "
        "MLXSERVE_WORKER_FORGET_AFTER at least 60 (seconds)"
    )

# Distinct values of one label of one metric with their own series (fleet and worker metrics);
# later ones are counted under "__overflow__". Registered model names always have their own.
# What the admin calls this deployment ("mlxserve · <name>"): say which fleet, or which stage.
MLXSERVE_SITE_NAME = os.environ.get("MLXSERVE_SITE_NAME", "").strip() or socket.gethostname()

METRIC_LABEL_LIMIT = env_int("MLXSERVE_METRIC_LABEL_LIMIT", 100)
if METRIC_LABEL_LIMIT < 0:
    raise ImproperlyConfigured(f"MLXSERVE_METRIC_LABEL_LIMIT must be 0 or more, got {METRIC_LABEL_LIMIT}")

SPECTACULAR_SETTINGS = {
    "TITLE": "mlxserve",
    "DESCRIPTION": "Telemetry and event control plane for LLM generation on mlx-lm.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI's files come from the installed sidecar package, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# -- Redis: events, config, Celery -------------------------------------------------

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# The throttle counts live here, shared by every web process.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "mlxserve",
    }
}
EVENTS_STREAM = env_str("MLXSERVE_EVENTS_STREAM", "mlxserve:events")
EVENTS_CONSUMER_GROUP = env_str("MLXSERVE_EVENTS_GROUP", "mlxserve-ingest")
TELEMETRY_CONFIG_KEY = env_str("MLXSERVE_CONFIG_KEY", "mlxserve:telemetry:config")

# Workers.
WORKER_CONTROL_CHANNEL = env_str("MLXSERVE_CONTROL_CHANNEL", "mlxserve:control")
WORKER_SOURCE = env_str("MLXSERVE_WORKER_SOURCE", "")  # default: "<host>/<celery node name>"
WORKER_SPOOL_DIR = env_str("MLXSERVE_SPOOL_DIR", str(VAR_DIR / "spool"))
# A worker's spool past this size drops its oldest events (counted and logged); 0: no cap.
WORKER_SPOOL_MAX_BYTES = env_int("MLXSERVE_SPOOL_MAX_BYTES", 1024**3)
WORKER_MAX_MODELS = env_int("MLXSERVE_MAX_MODELS", 2)
WORKER_MAX_MODEL_BYTES = env_int("MLXSERVE_MAX_MODEL_BYTES", 0)  # 0: no byte limit
WORKER_METRICS_HOST = env_str("MLXSERVE_METRICS_HOST", "0.0.0.0")
# Several workers on one host serve /metrics on prometheusPort + this (worker_service sets 0, 1, 2 ...).
WORKER_METRICS_PORT_OFFSET = env_int("MLXSERVE_METRICS_PORT_OFFSET", 0)
if not 0 <= WORKER_METRICS_PORT_OFFSET <= 1000:
    raise ImproperlyConfigured(
        f"MLXSERVE_METRICS_PORT_OFFSET must be from 0 to 1000, got {WORKER_METRICS_PORT_OFFSET}"
    )
# How long events gather before a batch goes to Redis (see README, Figures).
WORKER_PUBLISH_LINGER_MS = env_int("MLXSERVE_PUBLISH_LINGER_MS", 250)
# Seconds between a worker's runtimeStatus heartbeats; unset: the config's exportIntervalMs (as the
# contract has it). Set it the same on web hosts: staleness is judged by it.
WORKER_HEARTBEAT_SECONDS = env_int("MLXSERVE_HEARTBEAT_SECONDS", 0)
if WORKER_HEARTBEAT_SECONDS < 0:
    raise ImproperlyConfigured(
        f"MLXSERVE_HEARTBEAT_SECONDS must be 0 (follow the config) or more, got {WORKER_HEARTBEAT_SECONDS}"
    )
DEMO_MODEL_DIR = env_str("MLXSERVE_DEMO_MODEL_DIR", str(VAR_DIR / "demo-model"))
# The models a worker serves, by registered name, comma-separated: it takes tasks from those models'
# queues only. Empty: every model, from the default queue.
WORKER_MODELS = tuple(
    name.strip() for name in env_str("MLXSERVE_WORKER_MODELS", "").split(",") if name.strip()
)
# Generations a worker runs at once (continuous batching, docs/workers.md). Default: one per 2 GiB
# of the machine's memory, from 1 to 32. 1 runs one at a time on Celery's solo pool; more run
# Celery's thread pool, whose threads only wait while one thread generates for all of them.
WORKER_CONCURRENCY = env_int(
    "MLXSERVE_WORKER_CONCURRENCY",
    max(1, min(32, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**31)),
)
if not 1 <= WORKER_CONCURRENCY <= 256:
    raise ImproperlyConfigured(f"MLXSERVE_WORKER_CONCURRENCY must be from 1 to 256, got {WORKER_CONCURRENCY}")
# Bytes of key-value cache a worker's generations may hold together; 0: 80% of what mlx may use on
# the machine (Metal's recommended working set on a Mac), less the loaded models' weights.
WORKER_KV_BYTES = env_int("MLXSERVE_WORKER_KV_BYTES", 0)
if WORKER_KV_BYTES < 0:
    raise ImproperlyConfigured(
        f"MLXSERVE_WORKER_KV_BYTES must be 0 (from the machine) or more, got {WORKER_KV_BYTES}"
    )

# Serving (the /v1/ endpoints, and POST /api/generations/). A request still in the queue after
# MLXSERVE_QUEUE_TIMEOUT_S fails (503), and a worker that takes it later drops it; one still
# generating after MLXSERVE_REQUEST_TIMEOUT_S is stopped.
QUEUE_TIMEOUT_S = env_int("MLXSERVE_QUEUE_TIMEOUT_S", 60)
REQUEST_TIMEOUT_S = env_int("MLXSERVE_REQUEST_TIMEOUT_S", 600)
if not 1 <= QUEUE_TIMEOUT_S <= 86400 or not 1 <= REQUEST_TIMEOUT_S <= 86400:
    raise ImproperlyConfigured(
        "MLXSERVE_QUEUE_TIMEOUT_S and MLXSERVE_REQUEST_TIMEOUT_S must be from 1 to 86400 (seconds)"
    )
# What /v1/models says owns the models.
SERVING_OWNER = env_str("MLXSERVE_SERVING_OWNER", "mlxserve")

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Generations are long: acknowledge after the work, give a task back if its
# worker dies.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A worker holds as many tasks as it has room for, no more: with late acknowledgement and a multiplier
# of 1 the prefetch count is the pool's size, and worker_disable_prefetch (Redis brokers) also has the
# consumer fetch only while fewer tasks are reserved than the pool has threads.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_DISABLE_PREFETCH = True
CELERY_WORKER_POOL = "solo" if WORKER_CONCURRENCY == 1 else "threads"
CELERY_WORKER_CONCURRENCY = WORKER_CONCURRENCY
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A task whose worker vanished (killed, host lost) goes back on the queue after
# this long. It must exceed the longest generation, or a running one is re-run.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("MLXSERVE_TASK_VISIBILITY_TIMEOUT", 3600)}
# A generation whose attempts keep dying with their worker (out of memory, say) is not handed to
# the next worker past this many attempts: the next one ends it with an error event instead.
# Signed generation tasks (events.signing): the control plane's Ed25519 key, and on workers its
# public half; a worker with a verify key runs only tasks the control plane signed.
TASK_SIGNING_KEY = env_str("MLXSERVE_TASK_SIGNING_KEY", "")
TASK_VERIFY_KEY = env_str("MLXSERVE_TASK_VERIFY_KEY", "")
MAX_ATTEMPTS = env_int("MLXSERVE_MAX_ATTEMPTS", 3)
if MAX_ATTEMPTS < 1:
    raise ImproperlyConfigured(f"MLXSERVE_MAX_ATTEMPTS must be at least 1, got {MAX_ATTEMPTS}")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
