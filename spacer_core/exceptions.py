"""Exception classes, named and shaped as pyspacer's so callers can catch either."""


class ConfigError(Exception):
    """A setting is missing or has a value of the wrong form."""


class DataLimitError(Exception):
    """An image or point list exceeds MAX_IMAGE_PIXELS / MAX_POINTS_PER_IMAGE."""

    @classmethod
    def too_many_pixels(cls, image_key: str, width: int, height: int, limit: int) -> "DataLimitError":
        """The error for an image over the pixel limit, in pyspacer's words."""
        subject = f"Image {image_key}" if image_key else "Image"
        return cls(
            f"{subject} has {width} x {height} = {width * height} total pixels,"
            f" which is larger than the max allowed of {limit}."
        )


class HashMismatchError(Exception):
    """An extractor file's sha256 differs from the one its message promised."""


class RowColumnInvalidError(Exception):
    """A row or column is not an int, is negative, or lies outside the image."""


class RowColumnMismatchError(Exception):
    """A requested (row, col) is absent from a feature file."""


class RowColumnMissingError(Exception):
    """A legacy feature file has no row/col information to index by."""


class TrainingLabelsError(Exception):
    """Training labels cannot form usable train / ref / val sets."""


class URLDownloadError(Exception):
    """Reading from a url DataLocation failed; keeps the underlying error."""

    def __init__(self, message: str, original_error: BaseException):
        super().__init__(message)
        self.message = message
        self.original_error = original_error

    def __str__(self) -> str:
        return (
            f"{self.message} /"
            f" Details - {type(self.original_error).__name__}:"
            f" {self.original_error}"
        )


class FeatureDimensionError(ValueError):
    """Features have a different dimension from the one a classifier was trained on."""
