"""Settings, read as pyspacer reads them, exposed as module attributes.

Each setting comes from the first source that has a non-empty value:

1. the environment variable ``SPACER_<NAME>``;
2. a ``secrets.json`` file (``SPACER_SECRETS_PATH`` if set, else
   ``secrets.json`` in the directory above the package, as pyspacer does);
3. Django's ``settings.SPACER`` dict, when Django is importable and
   configured (consulted only when there is no secrets file, like pyspacer).

Values are read once at import. Call :func:`reload` to read them again (tests
and the server do this after changing the environment); tests may also
``monkeypatch.setattr(config, NAME, value)`` directly, since every consumer
reads ``config.NAME`` at call time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, ContextDecorator
from contextvars import ContextVar, Token
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from PIL import Image, ImageFile

from spacer_core.exceptions import ConfigError

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent
REPO_DIR = APP_DIR.parent
DEFAULT_SECRETS_PATH = REPO_DIR / "secrets.json"

_NO_DEFAULT: Any = object()

# Fixed vocabularies (not configurable), as in pyspacer.
TASKS = ["extract_features", "train_classifier", "classify_features", "classify_image"]
CLASSIFIER_TYPES = ["LR", "MLP"]
TRAINER_NAMES = ["minibatch"]
STORAGE_TYPES = ["s3", "filesystem", "memory", "url"]

# Settings whose values must never be printed in full.
SECRET_NAMES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})

# name -> (type, default). Order is the order check() prints them in.
SETTINGS: dict[str, tuple[type, Any]] = {
    "AWS_ACCESS_KEY_ID": (str, None),
    "AWS_SECRET_ACCESS_KEY": (str, None),
    "AWS_SESSION_TOKEN": (str, None),
    "AWS_PROFILE_NAME": (str, None),
    "AWS_ANONYMOUS": (bool, False),
    "AWS_REGION": (str, None),
    # S3-compatible stores (moto, MinIO, ...); None means AWS itself.
    "AWS_ENDPOINT_URL": (str, None),
    "EXTRACTORS_CACHE_DIR": (str, None),
    "TEST_BUCKET": (str, None),
    "CN_TEST_EXTRACTORS_BUCKET": (str, None),
    "CN_FIXTURES_BUCKET": (str, None),
    "LOG_DESTINATION": (str, None),
    "LOG_LEVEL": (str, "INFO"),
    "MAX_IMAGE_PIXELS": (int, 10000 * 10000),
    "MAX_POINTS_PER_IMAGE": (int, 1000),
    "TRAINING_BATCH_LABEL_COUNT": (int, 5000),
}
CONFIGURABLE_VARS = list(SETTINGS)

# Populated by reload(); declared here for type checkers and readers.
SECRETS_PATH: Path | None = None
SECRETS: dict[str, Any] | None = None
SETTINGS_FROM_DJANGO: Mapping[str, Any] | None = None
AWS_ACCESS_KEY_ID: str | None = None
AWS_SECRET_ACCESS_KEY: str | None = None
AWS_SESSION_TOKEN: str | None = None
AWS_PROFILE_NAME: str | None = None
AWS_ANONYMOUS: bool = False
AWS_REGION: str | None = None
AWS_ENDPOINT_URL: str | None = None
EXTRACTORS_CACHE_DIR: str | None = None
TEST_BUCKET: str | None = None
CN_TEST_EXTRACTORS_BUCKET: str | None = None
CN_FIXTURES_BUCKET: str | None = None
LOG_DESTINATION: str | None = None
LOG_LEVEL: str = "INFO"
MAX_IMAGE_PIXELS: int = 10000 * 10000
MAX_POINTS_PER_IMAGE: int = 1000
TRAINING_BATCH_LABEL_COUNT: int = 5000
HAS_CAFFE: bool = False
LOCAL_FIXTURE_DIR = str(REPO_DIR / "tests" / "fixtures")


def _secrets_path() -> Path | None:
    explicit = os.environ.get("SPACER_SECRETS_PATH")
    if explicit:
        return Path(explicit)
    return DEFAULT_SECRETS_PATH if DEFAULT_SECRETS_PATH.exists() else None


def _read_secrets(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"SPACER_SECRETS_PATH names a missing file: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Secrets file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Secrets file {path} must hold a JSON object.")
    return data


def _read_django_settings() -> Mapping[str, Any] | None:
    try:
        from django.conf import settings  # type: ignore[import-not-found]
        from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return settings.SPACER  # type: ignore[no-any-return]
    except (ImproperlyConfigured, AttributeError):
        return None


def get_config_detection_result() -> str:
    """Say which configuration sources were found (for error messages)."""
    secrets = "Secrets file found." if SECRETS else "Secrets file not found."
    django = " SPACER Django setting found." if SETTINGS_FROM_DJANGO else " SPACER Django setting not found."
    return secrets + django


def _is_set(value: Any) -> bool:
    # An empty string means "not specified", as in pyspacer.
    return value not in ("", None)


def _cast(key: str, value: Any, value_type: type) -> Any:
    if value_type is bool:
        if isinstance(value, bool):
            return value
        if value == "True":
            return True
        if value == "False":
            return False
        raise ConfigError(f"{key} may only be True or False (got {value!r}).")
    if value_type is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer (got {value!r}).")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be an integer (got {value!r}).") from None
    if value_type is str:
        return value if isinstance(value, str) else str(value)
    raise TypeError(f"Unsupported setting type {value_type!r} for {key}.")


def get_config_value(key: str, value_type: type = str, default: Any = _NO_DEFAULT) -> Any:
    """Return setting ``key`` from env, secrets.json or Django, cast to ``value_type``.

    Raises ConfigError when the setting is absent and has no default, or when
    its text cannot be cast.
    """
    env_value = os.environ.get("SPACER_" + key)
    if _is_set(env_value):
        return _cast(key, env_value, value_type)

    source: Mapping[str, Any] | None = SECRETS if SECRETS else SETTINGS_FROM_DJANGO
    if source:
        value = source.get(key)
        if _is_set(value):
            return _cast(key, value, value_type)

    if default is _NO_DEFAULT:
        raise ConfigError(f"{key} setting is required. (Debug info: {get_config_detection_result()})")
    return default


def _configure_logging() -> None:
    if not LOG_DESTINATION:
        return
    logging.basicConfig(
        level=LOG_LEVEL,
        filename=None if LOG_DESTINATION == "console" else LOG_DESTINATION,
        format="%(asctime)s - %(levelname)s:%(name)s\n%(message)s",
    )


def _configure_pillow() -> None:
    # Pillow's own bomb check must not fire before our clearer DataLimitError,
    # so give it a margin above our limit (pyspacer uses the same margin).
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS + 20000
    # Survey images are sometimes cut short in transfer; decode what is there.
    ImageFile.LOAD_TRUNCATED_IMAGES = True


def reload() -> None:
    """Read every setting again from its sources and update this module."""
    module = sys.modules[__name__]
    global SECRETS_PATH, SECRETS, SETTINGS_FROM_DJANGO, HAS_CAFFE
    SECRETS_PATH = _secrets_path()
    SECRETS = _read_secrets(SECRETS_PATH)
    SETTINGS_FROM_DJANGO = _read_django_settings()
    for name, (value_type, default) in SETTINGS.items():
        setattr(module, name, get_config_value(name, value_type=value_type, default=default))
    HAS_CAFFE = importlib.util.find_spec("caffe") is not None
    _configure_pillow()
    _configure_logging()


def filter_warnings() -> None:
    """Silence known-harmless ResourceWarnings that boto raises."""
    warnings.filterwarnings("ignore", category=ResourceWarning, message="unclosed.*<ssl.SSLSocket.*>")
    warnings.filterwarnings("ignore", category=ResourceWarning, message="unclosed.*<_io.TextIOWrapper.*>")


def _mask(value: str) -> str:
    # Enough to tell two keys apart, never enough to use one.
    if len(value) < 12:
        return "*" * len(value)
    return f"{value[:4]} ... {value[-4:]}"


def check() -> None:
    """Print every configurable setting, with secret values masked."""
    print(get_config_detection_result())
    module = sys.modules[__name__]
    for name in CONFIGURABLE_VARS:
        value = getattr(module, name)
        shown = _mask(str(value)) if value and name in SECRET_NAMES else str(value)
        print(f"{name}: {shown}")


class log_entry_and_exit(ContextDecorator):
    """Log (at DEBUG) entry to and exit from a block or function, with its duration."""

    def __init__(self, name: str):
        self.name = name
        self.start_time = 0.0

    def __enter__(self) -> log_entry_and_exit:
        self.start_time = time.time()
        logger.debug("Entering: %s", self.name)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        logger.debug("Exiting: %s after %f seconds.", self.name, time.time() - self.start_time)


reload()


T = TypeVar("T")


def scoped(var: ContextVar[T | None], value: T) -> AbstractContextManager[T]:
    """Set the context variable `var` to `value` for the duration of a with block."""
    return _Scoped(var, value)


class _Scoped(AbstractContextManager[T]):
    def __init__(self, var: ContextVar[T | None], value: T):
        self.var, self.value = var, value
        self._tokens: list[Token[T | None]] = []

    def __enter__(self) -> T:
        self._tokens.append(self.var.set(self.value))
        return self.value

    def __exit__(self, *exc: object) -> None:
        self.var.reset(self._tokens.pop())
