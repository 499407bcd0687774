"""Errors that leave a layer are library categories (a transport maps only those)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from spacer_core import _crop_rs, crop
from spacer_core.exceptions import (
    DataLimitError,
    ImageDecodeError,
    ImageError,
    InvalidInputError,
    PatchError,
    ResourceLimitError,
    SpacerError,
)
from spacer_core.survey.coralnet import CsvFormatError
from spacer_core.survey.workflow import SurveyError


def _png(width: int = 10, height: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def _library_type(exc: BaseException) -> bool:
    return isinstance(exc, SpacerError) and type(exc).__module__ == "spacer_core.exceptions"


@pytest.mark.parametrize(
    "data",
    [b"\xff\xd8\xff\xe0 broken jpeg", _png()[:40], b"BM broken bitmap", b"not an image at all"],
    ids=["jpeg", "png", "bmp", "garbage"],
)
def test_a_corrupt_image_through_crop_is_an_invalid_input(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        crop.crop_patches(data, [(0, 0)], image_key="reef-1.jpg")
    err = info.value
    assert isinstance(err, ImageError) and isinstance(err, InvalidInputError) and _library_type(err)
    assert not isinstance(err, _crop_rs.ImageDecodeError)
    assert str(err).startswith("reef-1.jpg: ") and str(err).count("reef-1.jpg") == 1
    assert crop.ImageDecodeError is ImageDecodeError and crop.PatchError is PatchError


def test_every_crop_entry_point_raises_library_types() -> None:
    broken = _png()[:40]
    calls = [
        lambda: crop.decode_image(broken),
        lambda: crop.crop_patches_into_chw(broken, [(0, 0)], np.empty((1, 3, 4, 4), np.float32), 4),
        lambda: crop.crop_patches_batch([_png(), broken], [[(0, 0)], [(0, 0)]]),
    ]
    for call in calls:
        with pytest.raises(ImageDecodeError) as info:
            call()
        assert _library_type(info.value)
    rgb = np.zeros((8, 10, 3), np.uint8)
    with pytest.raises(PatchError, match="outside") as patch:
        crop.crop_array(rgb, [(8, 0)], 4)
    assert isinstance(patch.value, InvalidInputError) and _library_type(patch.value)
    with pytest.raises(PatchError) as chw:
        crop.crop_array_into_chw(rgb, [(0, 0)], np.empty((2, 3, 4, 4), np.float32), 4)
    assert _library_type(chw.value)
    with pytest.raises(DataLimitError) as limit:
        crop.crop_patches(_png(), [(0, 0)], 4, max_pixels=10, image_key="big.png")
    assert isinstance(limit.value, ResourceLimitError)
    assert str(limit.value).startswith("Image big.png has 10 x 8 = 80 total pixels")


def test_survey_errors_are_input_errors() -> None:
    assert issubclass(SurveyError, InvalidInputError) and issubclass(SurveyError, ValueError)
    err = CsvFormatError("points.csv", "empty value", row=3, column="Row")
    assert isinstance(err, InvalidInputError) and isinstance(err, ValueError)
    assert str(err) == "points.csv, row 3, column 'Row': empty value"
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.path, again.row, again.column) == (str(err), "points.csv", 3, "Row")
