"""A real spacer gRPC server on a loopback port, run on its own event-loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.app import create_server, drain, start
from server.config import ServerConfig


class ServerThread:
    """Starts create_server(config) on port 0 in a background loop; `address` once up."""

    def __init__(self, config: ServerConfig):
        self.config = replace(config, port=0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None
        self.port = 0

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()

        async def up() -> tuple[Any, int]:
            server, port = create_server(self.config)
            await start(server)
            return server, port

        self.server, self.port = self._run(up())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 0) -> None:
        with contextlib.suppress(Exception):
            self._run(drain(self.server, grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# Where test data lives: pytest's temporary folders (under the system temp
# dir) and the committed fixtures. Servers in tests are confined to these,
# as a deployment is confined to its data roots.
TEST_DATA_ROOTS = (
    Path(tempfile.gettempdir()).resolve(),
    Path(__file__).resolve().parent.parent / "fixtures",
)


@contextlib.contextmanager
def running_server(config: ServerConfig | None = None, **overrides: Any) -> Iterator[ServerThread]:
    """Context manager: a started ServerThread, drained on exit.

    Without a config the server may use TEST_DATA_ROOTS (pass data_roots or
    allow_any_path=True to change that).
    """
    base = config or ServerConfig(workers=2, log_level="WARNING", data_roots=TEST_DATA_ROOTS)
    if overrides.get("allow_any_path"):
        overrides.setdefault("data_roots", ())
    thread = ServerThread(replace(base, **overrides)).start()
    try:
        yield thread
    finally:
        thread.stop()


# ---------------------------------------------------------------- test data


def make_image(path: Any, width: int = 96, height: int = 72, seed: int = 0) -> Any:
    """Write a small smooth-plus-noise RGB image (format from the suffix); returns path."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    noise = rng.integers(-20, 21, smooth.shape)
    pixels = np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a stub."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_classifier(path: Any, feature_dim: int = 1280, classes: tuple = (1, 2, 3), seed: int = 0) -> Any:
    """Store a fitted CalibratedClassifierCV (as pyspacer trains them) at path."""
    import pickle

    import numpy as np
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(seed)
    n = 30 * len(classes)
    x = rng.normal(size=(n, feature_dim))
    y = np.array([classes[i % len(classes)] for i in range(n)])
    x += np.eye(len(classes), feature_dim)[[classes.index(c) for c in y]] * 3
    clf = SGDClassifier(loss="log_loss", average=True, random_state=0).fit(x, y)
    calibrated = CalibratedClassifierCV(clf, cv="prefit").fit(x, y)
    with open(path, "wb") as f:
        pickle.dump(calibrated, f, protocol=2)
    return path


def extractor_json(weights_path: Any, sha256: str) -> dict[str, Any]:
    """pyspacer 0.14.0 JSON of an EfficientNetExtractor on a filesystem weights file."""
    return {
        "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
        "data_locations": {
            "weights": {"storage_type": "filesystem", "key": str(weights_path), "bucket_name": None}
        },
        "data_hashes": {"weights": sha256},
    }
