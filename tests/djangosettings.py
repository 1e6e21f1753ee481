"""Settings of tests/djangoapp.py (``DJANGOAPP_DB``: ``name:port`` of a
database of the private PostgreSQL cluster, through psycopg 3;
``DJANGOAPP_POOL=1``: through Django's connection pool, 16 at most)."""

import os
import typing as t

DATABASES: dict[str, t.Any] = {}
if os.environ.get("DJANGOAPP_DB"):
    _name, _port = os.environ["DJANGOAPP_DB"].rsplit(":", 1)
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql", "NAME": _name, "USER": "postgres",
        "HOST": "127.0.0.1", "PORT": _port, "CONN_MAX_AGE": 0,
        "OPTIONS": {"application_name": "djangoapp"},
    }
    if os.environ.get("DJANGOAPP_POOL") == "1":
        # Django's own connection pool (psycopg_pool), small on purpose.
        DATABASES["default"]["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 16, "timeout": 2}

DEBUG = False
SECRET_KEY = "geventctx-tests"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djangoapp"
FORCE_SCRIPT_NAME = "/mount"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.locale.LocaleMiddleware"]
USE_I18N = True
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("de", "German"), ("fr", "French")]
USE_TZ = True
TIME_ZONE = "UTC"
CACHES = {"default": {"BACKEND": "djangoapp.CountingCache"}}
LOGGING_CONFIG = None
