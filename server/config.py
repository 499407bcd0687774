"""The server's settings: one typed object, built once by the entry point.

Every setting has a command-line flag and a SPACER_* environment variable
(the flag wins). Image limits (max_image_pixels, max_points_per_image) are
the server runtime's own when set, else spacer_core.config's; the library's
process-wide values are never changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spacer_core.data_classes import DataLocation
from spacer_core.extractors import FeatureExtractor
from spacer_core.inference import BatcherSettings, check_batch_size
from spacer_core.limits import Limits
from spacer_core.runtime import DEFAULT_FAST_RECHECK_MARGIN, RuntimeSettings, check_fast_recheck_margin
from spacer_core.storage import ClientPolicy, StoragePolicy
from spacer_core.urlfetch import DEFAULT_MAX_BYTES, DEFAULT_TOTAL_TIMEOUT, UrlRules

MIB = 1024 * 1024

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("exact", "fast")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


class SettingError(ValueError):
    """A setting out of range; `setting` is its ServerConfig field, so a caller can name the flag."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server instance; defaults serve 127.0.0.1:50051."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Written with the bound port once listening (useful with port 0).
    port_file: Path | None = None
    device: str = "auto"
    precision: str = "exact"
    # In `fast` precision, scored points whose top two classes are closer than
    # this are recomputed in exact precision (RuntimeSettings.fast_recheck_margin).
    fast_recheck_margin: float = DEFAULT_FAST_RECHECK_MARGIN
    # Dynamic batcher: patches per network call (None: the backend's preferred
    # size, small on CPU where it also bounds memory, large on GPU) and how
    # long a batch may wait to fill (BatcherSettings.queue_delay_ms). Longer
    # than the library's 2 ms: requests come over the network, spread out
    # more than one process's own calls, and a little more wait fills fuller batches.
    batch_size: int | None = None
    queue_delay_ms: float = 5.0
    # Batch patches across requests (EfficientNet); False runs spacer_core.tasks per call.
    batching: bool = True
    # Interactive calls (ClassifyImage, ExtractFeatures) ahead of bulk streams
    # (ClassifyImages); False serves every request first come first served.
    priority: bool = True
    # A JSON file of extractors and classifiers to load and warm up before
    # health reports SERVING (see read_preload).
    preload: Path | None = None
    # A folder of weights files and classifiers the Open Inference Protocol's
    # RepositoryIndex lists and RepositoryModelLoad loads (docs/oip.md).
    model_repository: Path | None = None
    # Let a client's RepositoryModelLoad config replace a model the repository
    # provides, or another config's model, for every client (docs/oip.md).
    allow_model_override: bool = False
    # Models clients may hold loaded from a config at once (OIP RepositoryModelLoad).
    max_config_models: int = 64
    # Threads running blocking library work (decode, extract, train).
    workers: int = max(2, os.cpu_count() or 2)
    # Images one ClassifyImages stream may have in flight at once.
    stream_window: int = 4
    # Image tasks admitted across the server (running + waiting); beyond it
    # unary calls get RESOURCE_EXHAUSTED and streams wait.
    max_queue: int = 32
    # Bytes admitted image work may hold across the server (decoded images,
    # uint8 patches, float32 batch input; see pipeline.Footprint); beyond it
    # unary calls get RESOURCE_EXHAUSTED and streams wait. An image larger
    # than the budget runs alone.
    memory_budget_bytes: int = 512 * MIB
    # Filesystem DataLocations must lie under one of these; empty: the
    # working directory when the server is built (unless allow_any_path).
    data_roots: tuple[Path, ...] = ()
    # Let clients name any filesystem path (pyspacer's behaviour).
    allow_any_path: bool = False
    # Let url locations reach loopback and private addresses.
    allow_private_urls: bool = False
    # Read files under the data roots that have more than one hard link (another
    # name of such a file may lie outside the roots).
    allow_hard_links: bool = False
    # The S3 buckets clients may name; empty: any bucket.
    s3_buckets: tuple[str, ...] = ()
    # Largest url download and the time the whole download may take.
    url_max_bytes: int = DEFAULT_MAX_BYTES
    url_timeout_seconds: float = DEFAULT_TOTAL_TIMEOUT
    max_message_bytes: int = 64 * MIB
    # Seconds in-flight calls get to finish after SIGTERM.
    grace_seconds: float = 30.0
    # Bounds of this server's runtime (Limits); None keeps spacer_core.config's values.
    max_image_pixels: int | None = None
    max_points_per_image: int | None = None
    log_level: str = "INFO"
    # "json": one JSON object per log line.
    log_format: str = "text"
    # Prometheus /metrics on this port; None: no metrics endpoint. It has no
    # authentication (docs/security.md), so it can bind elsewhere than the
    # gRPC port: metrics_host, None meaning `host`.
    metrics_port: int | None = None
    metrics_host: str | None = None
    # TLS: certificate chain and key (PEM); with a client CA, clients must
    # present a certificate it signed (mutual TLS). None: plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A file holding the bearer token every call but health must carry.
    auth_token_file: Path | None = None
    # Bounds on what one request may ask for (spacer_core.limits.Limits):
    # checked before anything is allocated or run.
    max_epochs: int = 200
    max_hidden_units: int = 1024
    max_hidden_layers: int = 3
    max_feature_dim: int = 8192
    max_feature_file_bytes: int = 256 * MIB
    max_token_chars: int = 1024
    max_key_chars: int = 4096
    max_job_json_bytes: int = 4 * MIB
    max_training_images: int = 100_000
    max_training_annotations: int = 1_000_000
    # Worker threads RunJob and TrainClassifier may occupy at once (None:
    # half of `workers`, at least one), so interactive calls always find one.
    long_work_workers: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def metrics_bind_host(self) -> str:
        """The interface /metrics listens on: metrics_host, else the gRPC host."""
        return self.metrics_host or self.host

    @property
    def client_address(self) -> str:
        """Where a client on this machine reaches the server (a wildcard host means loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(self.host)
        return f"{host}:{self.port}" if host else self.address

    def validate(self) -> ServerConfig:
        """Raise ValueError naming the first setting that is out of range."""
        if self.device not in DEVICES:
            raise SettingError("device", f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise SettingError("precision", f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        try:
            check_fast_recheck_margin(self.fast_recheck_margin, "fast recheck margin")
        except ValueError as exc:
            raise SettingError("fast_recheck_margin", str(exc)) from None
        if self.log_level not in LOG_LEVELS:
            raise SettingError("log_level", f"log level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise SettingError(
                "log_format", f"log format must be one of {LOG_FORMATS}, got {self.log_format!r}"
            )
        if not 0 <= self.port <= 65535:
            raise SettingError("port", f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingError("metrics_port", f"metrics port must be in 0..65535, got {self.metrics_port}")
        try:
            check_batch_size(self.batch_size, "batch_size")
        except ValueError as exc:
            raise SettingError("batch_size", str(exc)) from None
        for name in (
            "workers",
            "stream_window",
            "max_queue",
            "max_message_bytes",
            "url_max_bytes",
            "max_epochs",
            "max_hidden_units",
            "max_hidden_layers",
            "max_feature_dim",
            "max_feature_file_bytes",
            "max_token_chars",
            "max_key_chars",
            "max_job_json_bytes",
            "max_training_images",
            "max_training_annotations",
            "long_work_workers",
            "memory_budget_bytes",
            "max_image_pixels",
            "max_points_per_image",
            "max_config_models",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingError(name, f"{name} must be >= 1, got {getattr(self, name)}")
        # Written so that nan fails too (every comparison with nan is False).
        for name in ("queue_delay_ms", "grace_seconds"):
            if not 0 <= getattr(self, name) < math.inf:
                raise SettingError(name, f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.url_timeout_seconds < math.inf:
            raise SettingError(
                "url_timeout_seconds",
                f"url_timeout_seconds must be a finite number > 0, got {self.url_timeout_seconds}",
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "preload"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise SettingError(name, f"{name}: no such file {str(path)!r}")
        if self.model_repository is not None and not Path(self.model_repository).is_dir():
            raise SettingError(
                "model_repository", f"model_repository: no such directory {str(self.model_repository)!r}"
            )
        roots = self.effective_data_roots()
        if self.model_repository is not None and roots is not None:
            repository = os.path.realpath(self.model_repository)
            if not any(
                repository == r or repository.startswith(r.rstrip(os.sep) + os.sep)
                for r in map(os.path.realpath, map(str, roots))
            ):
                raise ValueError(
                    f"model_repository {str(self.model_repository)!r} is outside the data roots "
                    f"({', '.join(map(str, roots))}): its models could never load; "
                    "put it under a --data-root or add its folder as one"
                )
        for root in self.data_roots:
            if not root.is_absolute():
                raise SettingError("data_roots", f"data root must be an absolute path, got {str(root)!r}")
        if self.allow_any_path and self.data_roots:
            raise ValueError("allow_any_path and data roots contradict each other: give one or the other")
        for bucket in self.s3_buckets:
            if not bucket or "/" in bucket:
                raise SettingError("s3_buckets", f"s3 bucket must be a bucket name, got {bucket!r}")
        return self

    def describe(self) -> dict[str, object]:
        """JSON-friendly view for `spacer check-config` and the startup log."""
        out = asdict(self)
        roots = self.effective_data_roots()
        out["data_roots"] = [str(p) for p in roots] if roots is not None else "any path (allow_any_path)"
        out["s3_buckets"] = list(self.s3_buckets) or "any"
        for name in (
            "port_file",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "auth_token_file",
            "preload",
            "model_repository",
        ):
            out[name] = str(getattr(self, name)) if getattr(self, name) else None
        out["batch_size"] = self.batch_size or "auto (the backend's preferred size: 2 on CPU, 128 on CUDA)"
        return out

    def runtime_settings(self) -> RuntimeSettings:
        """How this server's runtime runs networks (device, precision, batching)."""
        return RuntimeSettings(
            device=None if self.device == "auto" else self.device,
            precision=self.precision,
            fast_recheck_margin=self.fast_recheck_margin,
            batcher=BatcherSettings(max_batch_size=self.batch_size, queue_delay_ms=self.queue_delay_ms),
            limits=self.limits(),
        )

    def limits(self) -> Limits:
        """What one request may ask for: epochs, MLP layers, feature widths, file, name and image sizes."""
        return Limits(
            max_epochs=self.max_epochs,
            max_hidden_units=self.max_hidden_units,
            max_hidden_layers=self.max_hidden_layers,
            max_feature_dim=self.max_feature_dim,
            max_feature_file_bytes=self.max_feature_file_bytes,
            max_token_chars=self.max_token_chars,
            max_key_chars=self.max_key_chars,
            max_job_json_bytes=self.max_job_json_bytes,
            max_training_images=self.max_training_images,
            max_training_annotations=self.max_training_annotations,
            max_image_pixels=self.max_image_pixels,
            max_points_per_image=self.max_points_per_image,
            # Clients are told an image is damaged rather than scored on filler pixels.
            truncated_images=False,
        )

    @property
    def long_work_slots(self) -> int:
        """Worker threads long work (RunJob, TrainClassifier) may hold at once."""
        if self.long_work_workers is not None:
            return min(self.long_work_workers, self.workers)
        return max(1, self.workers // 2)

    def effective_data_roots(self) -> tuple[Path, ...] | None:
        """The folders clients may use: the data roots, else the working directory; None: any path."""
        if self.allow_any_path:
            return None
        return self.data_roots or (Path.cwd().resolve(),)

    def storage_policy(self) -> StoragePolicy:
        """What clients of this server may read and write (every storage type).

        Memory storage is never offered to clients: it is one store shared
        by the whole process. The model repository is read-only to them: the
        models it serves are the operator's, not a client's to replace.
        """
        return ClientPolicy(
            self.effective_data_roots(),
            read_only=[self.model_repository] if self.model_repository is not None else [],
            s3_buckets=self.s3_buckets or None,
            url_rules=UrlRules(
                allow_private=self.allow_private_urls,
                max_bytes=self.url_max_bytes,
                total_timeout=self.url_timeout_seconds,
            ),
            allow_hard_links=self.allow_hard_links,
        )


@dataclass(frozen=True)
class Preload:
    """Models a server loads before it reports SERVING."""

    extractors: tuple[FeatureExtractor, ...] = ()
    classifiers: tuple[DataLocation, ...] = ()


def read_preload(path: Path) -> Preload:
    """Parse a preload file; ValueError naming the file and entry when it is malformed.

    The file is a JSON object with optional lists "extractors" (pyspacer's
    extractor JSON: class_path, data_locations, data_hashes) and
    "classifiers" (pyspacer's DataLocation JSON: storage_type, key, bucket_name).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"preload file {str(path)!r}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"preload file {str(path)!r}: expected a JSON object with 'extractors' and/or 'classifiers'"
        )
    unknown = sorted(set(data) - {"extractors", "classifiers"})
    if unknown:
        raise ValueError(
            f"preload file {str(path)!r}: unknown keys {unknown}; expected 'extractors' and/or 'classifiers'"
        )

    def entries(name: str, build: Callable[[Any], Any]) -> tuple[Any, ...]:
        items = data.get(name, [])
        if not isinstance(items, list):
            raise ValueError(f"preload file {str(path)!r}: {name} must be a list")
        built = []
        for i, item in enumerate(items):
            try:
                built.append(build(item))
            except Exception as exc:  # any malformed entry: name it, don't crash the CLI
                raise ValueError(f"preload file {str(path)!r}: {name}[{i}]: {exc}") from None
        return tuple(built)

    def classifier(item: Any) -> DataLocation:
        if not isinstance(item, dict):
            raise ValueError("expected a DataLocation object (storage_type, key, bucket_name)")
        return DataLocation.deserialize(item)

    return Preload(entries("extractors", FeatureExtractor.deserialize), entries("classifiers", classifier))


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# (flag, dest, type, env var, help). One table serves argparse and the env.
_OPTIONS: list[tuple[str, str, Callable[[str], object], str, str]] = [
    ("--host", "host", str, "SPACER_HOST", "interface to listen on"),
    ("--port", "port", int, "SPACER_PORT", "port to listen on; 0 picks a free one"),
    ("--port-file", "port_file", Path, "SPACER_PORT_FILE", "write the bound port here"),
    ("--device", "device", str, "SPACER_DEVICE", "auto, cpu or cuda"),
    ("--precision", "precision", str, "SPACER_PRECISION", "exact or fast (reduced precision)"),
    (
        "--fast-recheck-margin",
        "fast_recheck_margin",
        float,
        "SPACER_FAST_RECHECK_MARGIN",
        "with fast precision: scored points whose top two class scores differ by less than this"
        " are recomputed exactly; 0 turns this off",
    ),
    (
        "--batch-size",
        "batch_size",
        int,
        "SPACER_BATCH_SIZE",
        "patches per network call, 1-256; default: the backend's preferred size (2 on CPU, 128 on CUDA)",
    ),
    ("--queue-delay-ms", "queue_delay_ms", float, "SPACER_QUEUE_DELAY_MS", "longest wait to fill a batch"),
    (
        "--batching",
        "batching",
        _bool,
        "SPACER_BATCHING",
        "true: batch patches across requests; false: one library call per image",
    ),
    (
        "--priority",
        "priority",
        _bool,
        "SPACER_PRIORITY",
        "true: interactive calls are served ahead of bulk streams; false: first come first served",
    ),
    (
        "--preload",
        "preload",
        Path,
        "SPACER_PRELOAD",
        "JSON file of extractors and classifiers to load and warm before health is SERVING",
    ),
    (
        "--model-repository",
        "model_repository",
        Path,
        "SPACER_MODEL_REPOSITORY",
        "folder of weights files and classifiers offered as Open Inference Protocol models",
    ),
    (
        "--max-config-models",
        "max_config_models",
        int,
        "SPACER_MAX_CONFIG_MODELS",
        "models clients may hold loaded from a config (OIP RepositoryModelLoad) at once",
    ),
    ("--workers", "workers", int, "SPACER_WORKERS", "threads for blocking work"),
    (
        "--stream-window",
        "stream_window",
        int,
        "SPACER_STREAM_WINDOW",
        "images in flight per ClassifyImages stream",
    ),
    (
        "--max-queue",
        "max_queue",
        int,
        "SPACER_MAX_QUEUE",
        "image tasks admitted server-wide before RESOURCE_EXHAUSTED",
    ),
    (
        "--memory-budget-mb",
        "memory_budget_mb",
        float,
        "SPACER_MEMORY_BUDGET_MB",
        "MiB that admitted image work may hold (decoded images, patches, batch input)",
    ),
    (
        "--max-message-mb",
        "max_message_mb",
        float,
        "SPACER_MAX_MESSAGE_MB",
        "largest request/response message, MiB",
    ),
    (
        "--url-max-mb",
        "url_max_mb",
        float,
        "SPACER_URL_MAX_MB",
        "largest body a url location may download, MiB",
    ),
    (
        "--url-timeout",
        "url_timeout_seconds",
        float,
        "SPACER_URL_TIMEOUT",
        "seconds a whole url download may take",
    ),
    ("--grace", "grace_seconds", float, "SPACER_GRACE_SECONDS", "seconds in-flight calls get after SIGTERM"),
    (
        "--max-image-pixels",
        "max_image_pixels",
        int,
        "SPACER_MAX_IMAGE_PIXELS",
        "most pixels an image may have (default: spacer_core's MAX_IMAGE_PIXELS)",
    ),
    (
        "--max-points-per-image",
        "max_points_per_image",
        int,
        "SPACER_MAX_POINTS_PER_IMAGE",
        "most points per image (default: spacer_core's MAX_POINTS_PER_IMAGE)",
    ),
    ("--max-epochs", "max_epochs", int, "SPACER_MAX_EPOCHS", "largest nbr_epochs a training may ask for"),
    (
        "--max-hidden-units",
        "max_hidden_units",
        int,
        "SPACER_MAX_HIDDEN_UNITS",
        "largest MLP hidden layer a trainer may ask for",
    ),
    (
        "--max-hidden-layers",
        "max_hidden_layers",
        int,
        "SPACER_MAX_HIDDEN_LAYERS",
        "most MLP hidden layers a trainer may ask for",
    ),
    (
        "--max-feature-dim",
        "max_feature_dim",
        int,
        "SPACER_MAX_FEATURE_DIM",
        "widest feature vector an extractor may produce",
    ),
    (
        "--max-feature-file-mb",
        "max_feature_file_mb",
        float,
        "SPACER_MAX_FEATURE_FILE_MB",
        "largest size a feature file may inflate to",
    ),
    ("--max-token-chars", "max_token_chars", int, "SPACER_MAX_TOKEN_CHARS", "longest job token"),
    (
        "--max-key-chars",
        "max_key_chars",
        int,
        "SPACER_MAX_KEY_CHARS",
        "longest location key (path, URL, S3 key)",
    ),
    (
        "--max-job-json-mb",
        "max_job_json_mb",
        float,
        "SPACER_MAX_JOB_JSON_MB",
        "largest RunJob job_msg_json, checked before it is parsed",
    ),
    (
        "--max-training-images",
        "max_training_images",
        int,
        "SPACER_MAX_TRAINING_IMAGES",
        "most images one training may list (train, ref and val together)",
    ),
    (
        "--max-training-annotations",
        "max_training_annotations",
        int,
        "SPACER_MAX_TRAINING_ANNOTATIONS",
        "most annotations one training may carry (train, ref and val together)",
    ),
    (
        "--long-work-workers",
        "long_work_workers",
        int,
        "SPACER_LONG_WORK_WORKERS",
        "worker threads RunJob and TrainClassifier may hold at once; default: half of --workers",
    ),
    ("--log-level", "log_level", str, "SPACER_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    ("--log-format", "log_format", str, "SPACER_LOG_FORMAT", "text or json (one object per line)"),
    (
        "--metrics-port",
        "metrics_port",
        int,
        "SPACER_METRICS_PORT",
        "serve Prometheus /metrics on this port; default: off",
    ),
    (
        "--metrics-address",
        "metrics_host",
        str,
        "SPACER_METRICS_ADDRESS",
        "interface /metrics listens on (it has no authentication); default: the --host interface",
    ),
    ("--tls-cert", "tls_cert", Path, "SPACER_TLS_CERT", "serve TLS with this PEM certificate chain"),
    ("--tls-key", "tls_key", Path, "SPACER_TLS_KEY", "PEM private key of --tls-cert"),
    (
        "--tls-client-ca",
        "tls_client_ca",
        Path,
        "SPACER_TLS_CLIENT_CA",
        "require client certificates signed by this PEM CA (mutual TLS)",
    ),
    (
        "--auth-token-file",
        "auth_token_file",
        Path,
        "SPACER_AUTH_TOKEN_FILE",
        "require 'authorization: Bearer <token>' with the token in this file (health stays open)",
    ),
]


# Flags whose value feeds a byte-sized setting: the help shows that default in MiB.
_MIB_SETTINGS = {
    "max_message_mb": "max_message_bytes",
    "url_max_mb": "url_max_bytes",
    "max_feature_file_mb": "max_feature_file_bytes",
    "max_job_json_mb": "max_job_json_bytes",
    "memory_budget_mb": "memory_budget_bytes",
}


def _default_text(dest: str) -> str:
    """The default of one flag as help shows it (the flags themselves default to None, meaning unset)."""
    if dest == "workers":
        return f"max(2, CPU count), {ServerConfig.workers} here"
    if dest in ("max_image_pixels", "max_points_per_image"):
        return "spacer_core's value, which spacer check-config prints"
    value = getattr(ServerConfig, _MIB_SETTINGS.get(dest, dest))
    if dest in _MIB_SETTINGS:
        return f"{value / MIB:g}"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the server flags to parser (defaults come from config_from_args; help shows them)."""
    for flag, dest, _type, env, help_text in _OPTIONS:
        shown = "" if "default:" in help_text else f" (default: {_default_text(dest)})"
        parser.add_argument(flag, dest=dest, default=None, help=f"{help_text}{shown} [{env}]")
    parser.add_argument(
        "--address",
        default=None,
        help="host:port in one flag (overridden by --host/--port; default: 127.0.0.1:50051) [SPACER_ADDRESS]",
    )
    parser.add_argument(
        "--data-root",
        dest="data_roots",
        action="append",
        default=None,
        help="allow filesystem DataLocations only under this directory; repeatable"
        " [SPACER_DATA_ROOTS, os.pathsep-separated]; default: the working directory",
    )
    parser.add_argument(
        "--allow-any-path",
        action="store_const",
        const=True,
        default=None,
        help="let clients read and write any file this process can reach (unsafe; default: off)"
        " [SPACER_ALLOW_ANY_PATH]",
    )
    parser.add_argument(
        "--allow-private-urls",
        action="store_const",
        const=True,
        default=None,
        help="let url locations reach loopback and private addresses (metadata addresses stay refused;"
        " default: off) [SPACER_ALLOW_PRIVATE_URLS]",
    )
    parser.add_argument(
        "--allow-model-override",
        action="store_const",
        const=True,
        default=None,
        help="let a client's OIP RepositoryModelLoad config replace a repository model, or another"
        " config's model, for every client (default: off) [SPACER_ALLOW_MODEL_OVERRIDE]",
    )
    parser.add_argument(
        "--allow-hard-links",
        action="store_const",
        const=True,
        default=None,
        help="read files under the data roots that have more than one hard link (default: off)"
        " [SPACER_ALLOW_HARD_LINKS]",
    )
    parser.add_argument(
        "--s3-bucket",
        dest="s3_buckets",
        action="append",
        default=None,
        help="allow s3 DataLocations only in this bucket; repeatable"
        " [SPACER_S3_BUCKETS, comma-separated]; default: any bucket",
    )


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must look like host:port, got {address!r}")
    return host.strip("[]"), int(port)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Combine flags, SPACER_* variables and defaults into a validated config."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}

    # Where each setting came from, to name it when its value is out of range.
    sources: dict[str, str] = {}
    address = args.address or env.get("SPACER_ADDRESS") or None
    if address:
        values["host"], values["port"] = _split_address(address)
        sources["host"] = sources["port"] = "--address" if args.address else "SPACER_ADDRESS / --address"

    for _flag, dest, cast, var, _help in _OPTIONS:
        raw = getattr(args, dest, None)
        source = _flag
        if raw is None:
            raw = env.get(var) or None  # empty string means unset, as in spacer_core
            source = f"{var} / {_flag}"
        if raw is None:
            continue
        sources[_MIB_SETTINGS.get(dest, dest)] = source
        try:
            values[dest] = cast(raw)
        except ValueError:
            kind = getattr(cast, "__name__", "value").strip("_")
            raise ValueError(f"{var} / {_flag}: cannot read {raw!r} as {kind}") from None

    for mib, setting in _MIB_SETTINGS.items():
        if mib in values:
            size = float(values.pop(mib))  # type: ignore[arg-type]
            if not math.isfinite(size):  # int() of nan or inf would fail without naming the flag
                raise ValueError(f"{sources[setting]}: {setting} must be a finite number of MiB, got {size}")
            values[setting] = int(size * MIB)
    if "log_level" in values:
        values["log_level"] = str(values["log_level"]).upper()

    roots = args.data_roots
    sources["data_roots"] = "--data-root"
    if roots is None and env.get("SPACER_DATA_ROOTS"):
        roots = [r for r in env["SPACER_DATA_ROOTS"].split(os.pathsep) if r]
        sources["data_roots"] = "SPACER_DATA_ROOTS / --data-root"
    if roots:
        values["data_roots"] = tuple(Path(r).expanduser().resolve() for r in roots)

    for dest, var in (
        ("allow_any_path", "SPACER_ALLOW_ANY_PATH"),
        ("allow_private_urls", "SPACER_ALLOW_PRIVATE_URLS"),
        ("allow_model_override", "SPACER_ALLOW_MODEL_OVERRIDE"),
        ("allow_hard_links", "SPACER_ALLOW_HARD_LINKS"),
    ):
        flag = getattr(args, dest, None)
        if flag is None and env.get(var):
            try:
                flag = _bool(env[var])
            except ValueError:
                raise ValueError(f"{var}: cannot read {env[var]!r} as a boolean") from None
        if flag is not None:
            values[dest] = flag

    buckets = getattr(args, "s3_buckets", None)
    sources["s3_buckets"] = "--s3-bucket"
    if buckets is None and env.get("SPACER_S3_BUCKETS"):
        buckets = env["SPACER_S3_BUCKETS"].split(",")
        sources["s3_buckets"] = "SPACER_S3_BUCKETS / --s3-bucket"
    if buckets:
        values["s3_buckets"] = tuple(b.strip() for b in buckets if b.strip())

    try:
        return ServerConfig(**values).validate()  # type: ignore[arg-type]
    except SettingError as exc:
        # Only a setting given here has a flag to name; a default out of range stays as it is.
        if exc.setting not in sources or exc.setting not in values:
            raise
        raise ValueError(f"{sources[exc.setting]}: {exc}") from None
