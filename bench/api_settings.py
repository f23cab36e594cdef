"""Settings for bench/api.py: the project's, plus the offset-paginated baseline list."""

from mlxserve.settings import *  # noqa: F403

ROOT_URLCONF = "bench.api_urls"
API_POST_RATE = ""
