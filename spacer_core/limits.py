"""Bounds on the sizes a message may ask for, checked before anything is allocated or run.

A message names epochs, network layers, feature widths and files whose
content decides how much memory and time a task takes. `Limits` holds the
bounds; the active ones (`current()`) are those of the runtime in use
(`Runtime.activate()`), so a server applies its own to every call while a
library caller keeps the library's defaults, which allow everything
pyspacer allows except feature files that inflate past 1 GiB.

Each check raises `LimitExceededError` (a `ResourceLimitError`; over gRPC
RESOURCE_EXHAUSTED) naming the field and the bound.
"""

from __future__ import annotations

import ast
import io
import struct
import zipfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from spacer_core import config
from spacer_core.exceptions import DataLimitError, InvalidInputError, ResourceLimitError

MIB = 1 << 20


class LimitExceededError(ResourceLimitError):
    """A message asks for more than a configured limit allows."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds on client-chosen sizes; None means unbounded.

    max_epochs: a training's `nbr_epochs`.
    max_hidden_units: units in one MLP hidden layer.
    max_hidden_layers: MLP hidden layers.
    max_feature_dim: features per point an extractor may produce
        (DummyExtractor's `feature_dim`, a Caffe definition's output blob).
    max_feature_file_bytes: what a feature file may inflate to (the sizes
        in its zip directory and array headers, checked before reading).
    max_token_chars: a job token.
    max_key_chars: a location key (path, URL, S3 key).
    max_image_pixels, max_points_per_image: an image's width x height and
        its point count. None leaves pyspacer's settings in charge
        (`config.MAX_IMAGE_PIXELS`, `config.MAX_POINTS_PER_IMAGE`), so a
        library caller changing those still gets what pyspacer gives; a
        runtime that sets them keeps its bound to its own work.
    truncated_images: whether an image whose data ends or breaks off early
        is decoded as far as it goes (True) or refused (False). None follows
        Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES`, which pyspacer's settings
        turn on.
    max_job_json_bytes: the text of one pyspacer job (RunJob), checked
        before it is parsed.
    max_training_images, max_training_annotations: images and annotations
        in one training request (train, ref and val together), counted
        before any annotation is converted.
    """

    max_epochs: int | None = None
    max_hidden_units: int | None = None
    max_hidden_layers: int | None = None
    max_feature_dim: int | None = None
    max_feature_file_bytes: int | None = 1024 * MIB
    max_token_chars: int | None = None
    max_key_chars: int | None = None
    max_image_pixels: int | None = None
    max_points_per_image: int | None = None
    truncated_images: bool | None = None
    max_job_json_bytes: int | None = None
    max_training_images: int | None = None
    max_training_annotations: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_points_per_image"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, got {value!r}")

    @property
    def allow_truncated_images(self) -> bool:
        """Whether a truncated image is decoded as far as it goes here (else refused)."""
        if self.truncated_images is not None:
            return self.truncated_images
        from PIL import ImageFile

        return bool(ImageFile.LOAD_TRUNCATED_IMAGES)

    @property
    def image_pixels(self) -> int:
        """The most pixels an image may have here (this runtime's bound, else pyspacer's setting)."""
        # Read at call time: pyspacer callers change config.MAX_IMAGE_PIXELS at runtime.
        return self.max_image_pixels if self.max_image_pixels is not None else int(config.MAX_IMAGE_PIXELS)

    @property
    def points_per_image(self) -> int:
        """The most points one image may name here (this runtime's bound, else pyspacer's setting)."""
        if self.max_points_per_image is not None:
            return self.max_points_per_image
        return int(config.MAX_POINTS_PER_IMAGE)

    def check_point_count(self, count: int, field: str = "rowcols", image: str | None = None) -> None:
        """Refuse more points for one image than `points_per_image`, from the count alone.

        With `image`, the error words it as extraction does for that image.
        """
        bound = self.points_per_image
        if count > bound and image is not None:
            raise DataLimitError(
                f"{field}: {count} point locations were specified for image {image},"
                f" and that's larger than the max allowed of {bound}."
            )
        if count > bound:
            raise LimitExceededError(
                f"{field} holds {count} points; this server allows at most {bound} per image"
                " (max_points_per_image)"
            )

    def check_training_counts(self, per_image: Sequence[tuple[str, int]], field: str = "labels") -> None:
        """Check a training request's (image, annotation count) pairs before anything is expanded.

        An image may carry at most `points_per_image` annotations: its
        feature file cannot hold more points than an extraction allows.
        """
        _at_most(f"{field} (images)", len(per_image), self.max_training_images)
        total = 0
        for name, count in per_image:
            self.check_point_count(count, name)
            total += count
        _at_most(f"{field} (annotations)", total, self.max_training_annotations)

    def check_job_text(self, text: str | bytes, field: str = "job_msg_json") -> None:
        """Refuse a job text over `max_job_json_bytes`, before it is parsed."""
        bound = self.max_job_json_bytes
        # A character may take up to 4 bytes; the length alone decides most texts.
        if bound is None or len(text) * (1 if isinstance(text, bytes) else 4) <= bound:
            return
        size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
        if size > bound:
            raise LimitExceededError(
                f"{field} is {size} bytes; this server allows at most {bound} (max_job_json_bytes)"
            )

    def check_job_shape(self, data: Any, field: str = "job_msg_json") -> None:
        """Count each task's points and annotations in a parsed job, before any is read or built.

        Looks only at list lengths where pyspacer's job JSON keeps points
        (`rowcols`) and labels (`labels`, 0.5.0's `train_labels` and
        `val_labels`); what is not a list or an object there is left to
        deserialisation to refuse.
        """
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(tasks, list):
            return
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                continue
            where = f"{field}.tasks[{i}]"
            rowcols = task.get("rowcols")
            if isinstance(rowcols, list):
                image = task.get("image_loc")
                key = image.get("key") if isinstance(image, dict) else None
                self.check_point_count(
                    len(rowcols), f"{where}.rowcols", key if isinstance(key, str) else None
                )
            per_image: list[tuple[str, int]] = []
            labels = task.get("labels")
            sets = [(f"labels.{k}", v) for k, v in labels.items()] if isinstance(labels, dict) else []
            sets += [(k, task[k]) for k in ("train_labels", "val_labels") if k in task]
            for name, image_labels in sets:
                if isinstance(image_labels, dict) and isinstance(image_labels.get("data"), dict):
                    image_labels = image_labels["data"]
                if isinstance(image_labels, dict):
                    per_image.extend(
                        (f"{where}.{name}[{j}]", len(annotations))
                        for j, annotations in enumerate(image_labels.values())
                        if isinstance(annotations, list)
                    )
            if per_image:
                self.check_training_counts(per_image, f"{where}.labels")

    def check_epochs(self, nbr_epochs: int, field: str = "nbr_epochs") -> None:
        _at_most(field, nbr_epochs, self.max_epochs)

    def check_hidden_layers(self, sizes: Sequence[int] | None, field: str = "mlp_hidden_layer_sizes") -> None:
        if sizes is None:
            return
        _at_most(f"{field} (layers)", len(sizes), self.max_hidden_layers)
        for i, size in enumerate(sizes):
            _at_most(f"{field}[{i}]", int(size), self.max_hidden_units)

    def check_feature_dim(self, dim: int, field: str = "feature_dim") -> None:
        _at_most(field, dim, self.max_feature_dim)

    def check_token(self, token: str, field: str = "job_token") -> None:
        _at_most(f"{field} (characters)", len(token), self.max_token_chars)

    def check_key(self, key: str, field: str = "key") -> None:
        _at_most(f"{field} (characters)", len(key), self.max_key_chars)

    def check_task(self, task: Any, where: str = "") -> None:
        """Check what a task message asks for: its token, epochs, MLP layers and feature width.

        Each must also be of its type (a client's JSON can hold anything),
        or the task is refused here rather than failing halfway through.
        """
        prefix = f"{where}." if where else ""
        token = getattr(task, "job_token", None)
        if token is not None:
            self.check_token(_text(token, prefix + "job_token"), prefix + "job_token")
        if hasattr(task, "nbr_epochs"):
            self.check_epochs(_whole(task.nbr_epochs, prefix + "nbr_epochs"), prefix + "nbr_epochs")
        cache_dir = getattr(task, "feature_cache_dir", None)
        if cache_dir is not None:
            _text(cache_dir, prefix + "feature_cache_dir")
        trainer = getattr(task, "trainer", None)
        sizes = getattr(trainer, "mlp_hidden_layer_sizes", None)
        field = prefix + "trainer.mlp_hidden_layer_sizes"
        if sizes is not None:
            if not isinstance(sizes, (list, tuple)):
                raise InvalidInputError(
                    f"{field} must be a list of whole numbers, not {type(sizes).__name__}"
                )
            self.check_hidden_layers([_whole(n, f"{field}[{i}]") for i, n in enumerate(sizes)], field)
        extractor = getattr(task, "extractor", None)
        if extractor is not None:
            field = prefix + "extractor.feature_dim"
            self.check_feature_dim(_whole(extractor.feature_dim, field), field)

    def check_json(self, data: Any, where: str = "job_msg_json") -> None:
        """Check every `job_token` and `key` string in a JSON document (a pyspacer job).

        Point lists (`rowcols`, a label set's annotations) are not walked:
        they hold numbers and labels, never a token or a location, and may
        hold millions of items.
        """
        stack: list[tuple[str, Any, bool]] = [(where, data, False)]
        while stack:
            path, value, label_set = stack.pop()
            if isinstance(value, dict):
                for name, item in value.items():
                    if name == "job_token":
                        self.check_token(_text(item, f"{path}.{name}"), f"{path}.{name}")
                    elif name == "key" and not isinstance(item, (dict, list)):
                        self.check_key(_text(item, f"{path}.{name}"), f"{path}.{name}")
                    elif (name == "rowcols" or label_set) and isinstance(item, list):
                        continue
                    elif isinstance(item, (dict, list)):
                        stack.append((f"{path}.{name}", item, name in _LABEL_SETS))
            elif isinstance(value, list):
                stack.extend(
                    (f"{path}[{i}]", item, False)
                    for i, item in enumerate(value)
                    if isinstance(item, (dict, list))
                )

    def check_npz(self, raw: bytes, source: str) -> None:
        """Refuse a feature file (npz) whose members would inflate past `max_feature_file_bytes`.

        Reads only the zip directory and each array's header, not the data.
        """
        bound = self.max_feature_file_bytes
        if bound is None:
            return
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            total = 0
            for info in archive.infolist():
                total += info.file_size
                if total > bound:
                    raise LimitExceededError(
                        f"{source}: the feature file inflates to more than {bound} bytes"
                        f" (max_feature_file_bytes)"
                    )
                with archive.open(info) as member:
                    declared = _npy_data_bytes(member.read(min(info.file_size, 4096)))
                if declared is not None and declared > info.file_size:
                    raise LimitExceededError(
                        f"{source}: array '{info.filename}' declares more data than it holds"
                    )


# Objects of pyspacer's job JSON whose list values are one image's annotations
# (0.14's train/ref/val sets; 0.5.0's train_labels/val_labels and their "data").
_LABEL_SETS = frozenset({"train", "ref", "val", "train_labels", "val_labels", "data"})


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{field} must be text, not {type(value).__name__}")
    return value


def _whole(value: Any, field: str) -> int:
    # bool is an int to Python, not to a client asking for epochs.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(
            f"{field} must be a whole number, not {type(value).__name__} {str(value)[:40]!r}"
        )
    return int(value)


def _at_most(field: str, value: int, bound: int | None) -> None:
    if bound is not None and value > bound:
        raise LimitExceededError(f"{field} is {value}; this server allows at most {bound}")


def _npy_data_bytes(head: bytes) -> int | None:
    """Bytes of array data an .npy header declares (None: not an .npy header we understand)."""
    if not head.startswith(b"\x93NUMPY") or len(head) < 10:
        return None
    major = head[6]
    if major == 1:
        (length,), start = struct.unpack("<H", head[8:10]), 10
    elif len(head) >= 12:
        (length,), start = struct.unpack("<I", head[8:12]), 12
    else:
        return None
    try:
        header: Any = ast.literal_eval(head[start : start + length].decode("latin1"))
        shape = tuple(int(n) for n in header["shape"])
        itemsize = np.dtype(header["descr"]).itemsize
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    count = 1
    for n in shape:
        count *= n
    return count * itemsize


_active: ContextVar[Limits | None] = ContextVar("spacer_limits", default=None)
LIBRARY_DEFAULTS = Limits()


def current() -> Limits:
    """The limits that apply in this context (the active runtime's, else the library's)."""
    return _active.get() or LIBRARY_DEFAULTS


def limits_scope(limits: Limits) -> AbstractContextManager[Limits]:
    """Apply `limits` to the library work done in this context."""
    return config.scoped(_active, limits)
