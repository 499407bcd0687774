"""The one place the library opens image bytes with Pillow.

Pillow knows dozens of formats, and some of its plugins hand the data to
other programs (EPS and PostScript to Ghostscript) or parse formats no
camera writes. Image bytes come from clients, so only the formats a survey
photo can be are opened: `SURVEY_FORMATS`. Anything else, and Pillow's own
decompression-bomb refusals, become library errors naming the image.
"""

from __future__ import annotations

import io
import re
from typing import IO

from PIL import (  # noqa: F401  (each registers its format with Pillow)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from spacer_core.exceptions import DataLimitError, ImageError

# Pillow's names for the formats survey photos come in (JPEG includes MPO,
# the JPEG variant of stereo and some phone cameras). None of these plugins
# runs a program.
SURVEY_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP")

_NOT_AN_IMAGE = "cannot identify image: not a JPEG, PNG, TIFF, BMP, GIF or WebP image"
_PIXELS = re.compile(r"\((\d+) pixels\)")


def open_image(source: bytes | IO[bytes], name: str = "") -> Image.Image:
    """Open (lazily) a JPEG, PNG, TIFF, BMP, GIF or WebP image; errors name ``name``.

    Raises ImageError for other formats and unreadable headers, DataLimitError
    for images over Pillow's decompression-bomb limit.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    prefix = f"{name}: " if name else ""
    try:
        return Image.open(stream, formats=SURVEY_FORMATS)
    except UnidentifiedImageError:
        # Pillow's message is the repr of our buffer: nothing a caller can use.
        raise ImageError(f"{prefix}{_NOT_AN_IMAGE}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # A warning too: it is raised where warnings are errors.
        found = _PIXELS.search(str(e))
        size = f"{found.group(1)} pixels" if found else "more pixels than allowed"
        from spacer_core import limits  # late: limits reads config, which reads the environment

        raise DataLimitError(
            f"{prefix}Image has {size}, which is larger than the max allowed of "
            f"{limits.current().image_pixels}."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{prefix}cannot identify image: {e}") from None
