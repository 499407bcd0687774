"""Overlap image decoding and cropping with the network.

While the network works on one image's patches (ONNX Runtime and PyTorch
release the GIL), a background thread decodes the next images and cuts their
patches (JPEG and PNG are decoded and cropped in Rust by
`spacer_core.crop.crop_patches`, other formats by Pillow; both release the
GIL), so on a multi-core machine neither waits for the other.

    for feats in extract_stream(((path, rowcols) for ...), batcher.extract_sync):
        ...
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from spacer_core import crop

ImageSource = Image.Image | bytes | str | os.PathLike[str] | np.ndarray
FeaturesOf = Callable[[np.ndarray], np.ndarray]


def decode_rgb(source: ImageSource) -> np.ndarray:
    """uint8 HxWx3 RGB from a Pillow image, encoded bytes, a file path or an RGB array."""
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise ValueError(f"RGB array must be uint8 HxWx3, got {source.dtype} {source.shape}")
        return source
    if isinstance(source, Image.Image):
        return crop.to_rgb_array(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(source)) as image:
            return crop.to_rgb_array(image)
    with Image.open(os.fspath(source)) as image:
        return crop.to_rgb_array(image)


def load_patches(source: ImageSource, rowcols: Sequence[tuple[int, int]]) -> np.ndarray:
    """Decode an image and cut its point patches: uint8 (N, 224, 224, 3), as pyspacer crops.

    Encoded bytes and file paths go straight to the Rust decoder (errors name the file).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return crop.crop_patches(bytes(source), rowcols)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open(path, "rb") as f:
            data = f.read()
        return crop.crop_patches(data, rowcols, image_key=path)
    return crop.crop_array(decode_rgb(source), rowcols)


def extract_stream(
    items: Iterable[tuple[ImageSource, Sequence[tuple[int, int]]]],
    features_of: FeaturesOf,
    *,
    prefetch: int = 2,
    loader: Callable[[ImageSource, Sequence[tuple[int, int]]], np.ndarray] = load_patches,
) -> Iterator[np.ndarray]:
    """Features (N, D) per (image, rowcols) item, in order, decoding ahead of the network.

    `features_of` is e.g. `batcher.extract_sync` or
    `functools.partial(run_in_batches, backend, batch_size=8)`. Up to
    `prefetch` images are decoded and cropped while the current one runs.
    An image that fails to load raises when its turn comes, naming nothing
    more than the loader's own error does.
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    window: collections.deque[concurrent.futures.Future[np.ndarray]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spacer-decode") as pool:
        try:
            for source, rowcols in items:
                window.append(pool.submit(loader, source, rowcols))
                if len(window) > prefetch:
                    yield features_of(window.popleft().result())
            while window:
                yield features_of(window.popleft().result())
        finally:
            for future in window:
                future.cancel()
