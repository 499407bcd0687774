"""A public start: ImageNet-pretrained EfficientNet-b0 weights in CoralNet's format.

CoralNet's reef-trained weights are shared on request only. The weights
published with lukemelas' EfficientNet-PyTorch 1.0 release
(`efficientnet-b0-355c32eb.pth`, ported from the TensorFlow originals) use
the same layout as CoralNet's network: TF-style SAME padding, TF BatchNorm
settings and the same parameter names. Converting them therefore only
replaces the 1000-class ImageNet head by an all-zero 1275-class one (the
head is never used for features) and wraps the state dict as
`{'net': state_dict}`.

The downloaded file is checked against its full sha256 before it is
unpickled. The pin is the digest the Julia package VaclavMacha/EfficientNets.jl
registers for the same URL (src/models.jl); its first 8 hex digits are the
`355c32eb` in the file name, which is what torch.hub checks.

`fetch_imagenet_weights(dest)` is the one call a command needs; run as
`python -m spacer_core.weights.imagenet --out FILE [--source FILE]` it
prints the written file's sha256.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spacer_core.exceptions import SpacerError, URLDownloadError
from spacer_core.extractors.efficientnet import FEATURE_DIM, NUM_CLASSES, EfficientNetB0, build_network
from spacer_core.extractors.torch_weights import DATAPARALLEL_PREFIX, WeightsFileError
from spacer_core.storage import write_file_atomic
from spacer_core.urlfetch import UrlRules, fetch
from spacer_core.weights.synthetic import WeightsFile

SOURCE_URL = (
    "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth"
)
SOURCE_SHA256 = "355c32ebf5c7b2e19ed8f926daea5b6d71c8744a49aab3148fc90775fbaac5a3"
# The file is about 21 MB; anything far larger is not it.
MAX_SOURCE_BYTES = 64 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 600.0

Progress = Callable[[str], None]

# Parameters the conversion makes rather than copies: the class head (ImageNet's
# 1000 classes are not CoralNet's) and BatchNorm step counters, which files
# saved by older PyTorch versions lack and inference never reads.
_HEAD_KEYS = ("_fc.weight", "_fc.bias")
_COUNTER_SUFFIX = "num_batches_tracked"


class ImagenetWeightsError(WeightsFileError):
    """A source file is not the published ImageNet EfficientNet-b0 weights, or cannot be converted."""


class ImagenetDownloadError(URLDownloadError):
    """The published weights could not be downloaded (no network, blocked, or the file moved)."""

    def __str__(self) -> str:
        return self.message


@functools.lru_cache(maxsize=1)
def _template() -> tuple[tuple[str, torch.Size, torch.dtype], ...]:
    """Names, shapes and dtypes of CoralNet's state dict (built on the meta device: nothing initialised)."""
    with torch.device("meta"):
        net = EfficientNetB0(NUM_CLASSES)
    return tuple((k, v.shape, v.dtype) for k, v in net.state_dict().items())


def _preview(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


def convert_state_dict(
    third_party_state_dict: Mapping[str, Any], label: str = "the state dict"
) -> OrderedDict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch b0 state dict -> the state dict CoralNet's network loads.

    Every convolution and BatchNorm tensor is copied as float32; the class
    head becomes zeros of CoralNet's shape (1275 x 1280); missing BatchNorm
    counters become 0. A `module.` prefix is accepted. Anything that is not
    an EfficientNet-b0 state dict raises ImagenetWeightsError naming `label`.
    """
    if not isinstance(third_party_state_dict, Mapping):
        raise ImagenetWeightsError(
            f"{label} is not an EfficientNet-b0 state dict: found {type(third_party_state_dict).__name__}"
        )
    source: dict[str, Any] = {}
    for key, value in third_party_state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ImagenetWeightsError(
                f"{label} is not an EfficientNet-b0 state dict: entry {key!r} is not a named tensor"
            )
        source[key.removeprefix(DATAPARALLEL_PREFIX)] = value
    template = {key: (shape, dtype) for key, shape, dtype in _template()}
    made = set(_HEAD_KEYS) | {k for k in template if k.endswith(_COUNTER_SUFFIX)}
    missing = [k for k in template if k not in made and k not in source]
    unexpected = [k for k in source if k not in template]
    if missing or unexpected:
        raise ImagenetWeightsError(
            f"{label} is not an EfficientNet-b0 state dict (EfficientNet-PyTorch names):"
            f" {len(missing)} missing keys {_preview(missing)},"
            f" {len(unexpected)} unexpected keys {_preview(unexpected)}"
        )
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    wrong: list[str] = []
    for key, (shape, dtype) in template.items():
        if key in _HEAD_KEYS:
            converted[key] = torch.zeros(shape, dtype=dtype)
            continue
        if key.endswith(_COUNTER_SUFFIX):
            counter = source.get(key)
            converted[key] = (
                counter.detach().to(device="cpu", dtype=dtype).clone().reshape(shape)
                if counter is not None and counter.numel() == 1
                else torch.zeros(shape, dtype=dtype)
            )
            continue
        value = source[key]
        if value.shape != shape:
            wrong.append(f"{key} {tuple(value.shape)} != {tuple(shape)}")
            continue
        if not value.is_floating_point():
            raise ImagenetWeightsError(f"{label}: {key} holds {value.dtype} values, not floating point")
        value = value.detach().to(device="cpu", dtype=dtype).clone()
        if not bool(torch.isfinite(value).all()):
            raise ImagenetWeightsError(f"{label}: {key} holds NaN or infinite values")
        converted[key] = value
    if wrong:
        raise ImagenetWeightsError(
            f"{label} is not an EfficientNet-b0 state dict: tensors of the wrong shape {_preview(wrong)}"
        )
    head = source.get("_fc.weight")
    if isinstance(head, torch.Tensor) and (head.dim() != 2 or head.shape[1] != FEATURE_DIM):
        raise ImagenetWeightsError(
            f"{label}: _fc.weight has shape {tuple(head.shape)}, not (classes, {FEATURE_DIM})"
        )
    return converted


def _load_source(data: bytes, label: str) -> Mapping[str, Any]:
    try:
        content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's text runs over many lines about its own internals: one line naming the file instead.
        raise ImagenetWeightsError(
            f"Cannot read {label}: not a PyTorch state dict loadable with weights_only=True"
            f" ({type(exc).__name__})"
        ) from exc
    if isinstance(content, Mapping):
        # Training checkpoints often nest the parameters one level down.
        for key in ("state_dict", "net"):
            inner = content.get(key)
            if isinstance(inner, Mapping):
                return inner
    return content


def _read_source(source: str | os.PathLike[str]) -> bytes:
    path = Path(source)
    try:
        with path.open("rb") as f:
            # Read one byte past the cap, so a file that grew after any size check is still caught.
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise ImagenetWeightsError(f"Cannot read the weights source {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SOURCE_BYTES:
        raise ImagenetWeightsError(
            f"{path} is larger than the {MAX_SOURCE_BYTES}-byte limit for EfficientNet-b0 weights"
        )
    return data


def _download(url: str, progress: Progress) -> bytes:
    progress(f"Downloading {url}")
    rules = UrlRules(max_bytes=MAX_SOURCE_BYTES, total_timeout=DOWNLOAD_TIMEOUT_S)
    try:
        return fetch(url, rules)
    except URLDownloadError as exc:
        detail = f"{type(exc.original_error).__name__}: {exc.original_error}"
        raise ImagenetDownloadError(
            f"Could not download the ImageNet weights from {url} ({detail})."
            " Without network access, download that file on another machine and pass it as the source"
            " (--source FILE).",
            exc.original_error,
        ) from exc


def _no_progress(_message: str) -> None:
    pass


def fetch_imagenet_weights(
    dest: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    *,
    url: str = SOURCE_URL,
    expected_sha256: str = SOURCE_SHA256,
    progress: Progress | None = None,
) -> WeightsFile:
    """Write ImageNet-pretrained EfficientNet-b0 weights in CoralNet's format to `dest`.

    `source` is the published file already on disk (air-gapped machines);
    without it the file is downloaded from `url`. Either way its sha256 must
    equal `expected_sha256` before it is read. The converted file is checked
    to load, written atomically, and returned with its own sha256 (the value
    for `--weights` hashes). `progress`, if given, receives one line per step.
    """
    say = progress or _no_progress
    if source is not None:
        label = os.fspath(source)
        say(f"Reading {label}")
        data = _read_source(source)
    else:
        label = url
        data = _download(url, say)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256.lower():
        raise ImagenetWeightsError(
            f"{label} has sha256 {digest}, not the published {expected_sha256}:"
            " it is not the expected EfficientNet-b0 ImageNet weights file (or it is damaged)"
        )
    say(f"sha256 verified: {digest}")
    state = convert_state_dict(_load_source(data, label), label)
    buffer = io.BytesIO()
    torch.save({"net": state}, buffer)
    converted = buffer.getvalue()
    # The written file must load the way every extractor will load it.
    build_network(converted, f"weights converted from {label}")
    write_file_atomic(dest, converted)
    sha256 = hashlib.sha256(converted).hexdigest()
    say(f"Wrote {os.fspath(dest)} (sha256 {sha256})")
    return WeightsFile(Path(dest), sha256)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the converted file and print its sha256; errors as one line, exit 1."""
    parser = argparse.ArgumentParser(
        prog="python -m spacer_core.weights.imagenet",
        description="Write ImageNet-pretrained EfficientNet-b0 weights in CoralNet's format.",
    )
    parser.add_argument("--out", required=True, help="weights file to write")
    parser.add_argument("--source", help=f"the published file, already downloaded from {SOURCE_URL}")
    args = parser.parse_args(argv)
    try:
        result = fetch_imagenet_weights(
            args.out,
            args.source,
            url=SOURCE_URL,
            expected_sha256=SOURCE_SHA256,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except SpacerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.sha256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
