"""DataLocation JSON for test messages."""

from __future__ import annotations

from typing import Any


def fs_loc(path: Any) -> dict[str, Any]:
    """A filesystem DataLocation as pyspacer serializes it."""
    return {"storage_type": "filesystem", "key": str(path), "bucket_name": None}
