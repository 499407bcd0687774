"""Location: where a piece of data lives. The bottom of the library's layers.

Storage, data classes, messages and extractors all name data by location,
so this depends on nothing but settings and exceptions. The public class is
`spacer_core.data_classes.DataLocation`, which adds pyspacer's DataClass
methods (JSON load/store through storage) to this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from spacer_core import config
from spacer_core.exceptions import InvalidDataError

L = TypeVar("L", bound="Location")


def require(condition: bool, message: str) -> None:
    """Raise InvalidDataError(message) unless condition holds."""
    if not condition:
        raise InvalidDataError(message)


class Location:
    """Where a piece of data lives: a path, a memory key, a URL or an S3 key."""

    def __init__(self, storage_type: str, key: str, bucket_name: str | None = None):
        require(
            storage_type in config.STORAGE_TYPES,
            f"Storage type not valid: {storage_type!r} (expected one of {config.STORAGE_TYPES}).",
        )
        if storage_type == "s3":
            require(bucket_name is not None, "Need bucket_name to use s3.")
        self.storage_type = storage_type
        self.key = key
        self.bucket_name = bucket_name

    @classmethod
    def example(cls: type[L]) -> L:
        return cls("memory", "my_blob")

    @property
    def filename(self) -> str:
        """Last part of the key's path (of the URL's path, for url locations)."""
        path = urlparse(self.key).path if self.storage_type == "url" else self.key
        return Path(path).name

    @property
    def is_remote(self) -> bool:
        return self.storage_type in ("url", "s3")

    @property
    def is_writable(self) -> bool:
        return self.storage_type != "url"

    def describe(self) -> str:
        """The location as a person writes it: a path, `s3://bucket/key`, `memory:key`, a URL."""
        if self.storage_type == "s3":
            return f"s3://{self.bucket_name}/{self.key}"
        if self.storage_type == "memory":
            return f"memory:{self.key}"
        return self.key

    @classmethod
    def deserialize(cls: type[L], data: Mapping[str, Any]) -> L:
        if not isinstance(data, Mapping):
            raise InvalidDataError(f"A DataLocation must be a JSON object, got {data!r}.")
        unknown = set(data) - {"storage_type", "key", "bucket_name"}
        require(not unknown, f"Unknown DataLocation fields {sorted(unknown)} in {dict(data)!r}.")
        require(
            "storage_type" in data and "key" in data,
            f"DataLocation needs storage_type and key: {dict(data)!r}.",
        )
        return cls(data["storage_type"], data["key"], data.get("bucket_name"))

    def serialize(self) -> dict[str, Any]:
        return {"storage_type": self.storage_type, "key": self.key, "bucket_name": self.bucket_name}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Location):
            return NotImplemented
        return (self.storage_type, self.key, self.bucket_name) == (
            other.storage_type,
            other.key,
            other.bucket_name,
        )

    def __hash__(self) -> int:
        return hash((self.storage_type, self.key, self.bucket_name))

    def __repr__(self) -> str:
        return f"DataLocation({self.storage_type!r}, {self.key!r}, bucket_name={self.bucket_name!r})"
