"""The library's exceptions: one hierarchy, with pyspacer's names.

Every error the library raises on purpose derives from `SpacerError` through
one of a few categories, and a transport maps only those categories (the gRPC
server turns them into status codes; anything else is a bug and becomes
INTERNAL). pyspacer's exception classes keep their names, and built-in bases
where callers may catch those (`ValueError`, `KeyError`, `FileNotFoundError`,
`PermissionError`).
"""

from __future__ import annotations


class SpacerError(Exception):
    """Base of every error the library raises on purpose.

    `location` is the piece of data the error is about (a DataLocation, a
    storage key or a URL), when there is one. It is set where the error is
    raised, so a transport can tell which of its inputs failed by comparing
    locations instead of reading the message.
    """

    location: object = None

    def __init__(self, *args: object, location: object = None):
        super().__init__(*args)
        self.location = location


# --- categories -------------------------------------------------------------


class InvalidInputError(SpacerError, ValueError):
    """The caller's input is malformed or inconsistent."""


class DataNotFoundError(SpacerError):
    """A location, key or point the input names does not exist."""


class AccessDeniedError(SpacerError, PermissionError):
    """The storage policy refuses this location."""


class PreconditionError(SpacerError):
    """The input is well formed but the data it names cannot be used as it is."""


class ResourceLimitError(SpacerError):
    """A size or capacity limit was reached."""


class UnavailableError(SpacerError):
    """A store or service the work depends on cannot be reached now; retrying may help."""


class DeadlineExceededError(SpacerError, TimeoutError):
    """The caller's deadline passed before the work could run; it was dropped unrun."""


# --- pyspacer's classes and specific errors ---------------------------------


class InvalidDataError(InvalidInputError, AssertionError):
    """A data class or message was built from invalid values.

    Also an AssertionError, because pyspacer signals these cases with
    ``assert`` and callers may catch that.
    """


class ConfigError(PreconditionError):
    """A setting is missing or has a value of the wrong form."""


class DataLimitError(ResourceLimitError):
    """An image or point list exceeds MAX_IMAGE_PIXELS / MAX_POINTS_PER_IMAGE."""

    @classmethod
    def too_many_pixels(cls, image_key: str, width: int, height: int, limit: int) -> DataLimitError:
        """The error for an image over the pixel limit, in pyspacer's words."""
        subject = f"Image {image_key}" if image_key else "Image"
        return cls(
            f"{subject} has {width} x {height} = {width * height} total pixels,"
            f" which is larger than the max allowed of {limit}."
        )


class HashMismatchError(PreconditionError):
    """An extractor file's sha256 differs from the one its message promised."""


class RowColumnInvalidError(InvalidInputError):
    """A row or column is not an int, is negative, or lies outside the image."""


class RowColumnMismatchError(DataNotFoundError):
    """A requested (row, col) is absent from a feature file."""


class RowColumnMissingError(DataNotFoundError):
    """A legacy feature file has no row/col information to index by."""


class TrainingLabelsError(InvalidInputError):
    """Training labels cannot form usable train / ref / val sets."""


class URLDownloadError(UnavailableError):
    """Reading from a url DataLocation failed; keeps the underlying error.

    `http_status` is the server's HTTP status when it answered (404 means
    the URL names nothing), else None.
    """

    def __init__(
        self, message: str, original_error: BaseException, *, location: object = None, reason: str = ""
    ):
        super().__init__(message, location=location)
        self.message = message
        self.original_error = original_error
        self.reason = reason
        status = getattr(original_error, "code", None)
        self.http_status: int | None = status if isinstance(status, int) else None

    def __str__(self) -> str:
        return f"{self.message} / Details - {type(self.original_error).__name__}: {self.original_error}"

    @property
    def public_message(self) -> str:
        """The message for a client: the URL and a plain reason, no library exception text.

        `str()` keeps pyspacer's form, which names Python exception types.
        """
        if not self.reason:
            return self.message
        return f"{self.message.rstrip('.')}: {self.reason}."


class MalformedURLError(URLDownloadError, InvalidInputError):
    """A url location that is not an http(s) URL with a host: no retry can succeed."""


class URLRefusedError(URLDownloadError, AccessDeniedError):
    """A URL was not fetched: its scheme, host address or redirect target is not allowed.

    An AccessDeniedError too: the server reports it as PERMISSION_DENIED.
    """


class FeatureDimensionError(PreconditionError, ValueError):
    """Features have a different dimension from the one a classifier was trained on."""


class StorageKeyError(DataNotFoundError, KeyError):
    """No blob under this key in memory storage."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; this message is a sentence.
        return str(self.args[0]) if self.args else ""


class StorageFileNotFoundError(DataNotFoundError, FileNotFoundError):
    """No file at this filesystem location."""


class StorageMissingObjectError(DataNotFoundError):
    """No object under this S3 key (or no such bucket)."""


class StorageUnavailableError(UnavailableError, ConnectionError):
    """A remote store (S3, a URL's host) did not answer."""


class StorageRequestError(PreconditionError):
    """A remote store refused the request (bad bucket, credentials, ...)."""


class ImageError(InvalidInputError):
    """The bytes given as an image cannot be decoded."""


class ImageDecodeError(ImageError):
    """Image bytes the decoder cannot read (corrupt, truncated, an unsupported layout).

    `spacer_core.crop` raises it for the Rust decoder's own decode errors too.
    """


class PatchError(InvalidInputError):
    """A crop that cannot be cut (a point outside the image, a bad crop size or buffer)."""


class QueueFullError(ResourceLimitError):
    """A bounded queue is full; try again later."""


class ShuttingDownError(UnavailableError):
    """The component was closed before this work could run."""


class InvalidInputTypeError(InvalidInputError, TypeError):
    """An input of the wrong type (also a TypeError, as Python raises for those)."""


class ClassifierFileError(InvalidInputError):
    """A file given as a classifier is not one (not a pickle, or not a classifier this server reads)."""


class UnsafePickleError(InvalidInputError):
    """A classifier pickle refers to something a trained classifier never contains.

    A ValueError too (through InvalidInputError), so code that catches
    pyspacer's load errors still does.
    """


# --- errors that are also what pyspacer raised ------------------------------
# pyspacer signals these with `assert` or a failing getattr; each class keeps
# our category and is also an instance of pyspacer's type, so callers'
# `except AssertionError` / `except AttributeError` keep working.


class UnknownTaskError(InvalidDataError):
    """A job names a task that does not exist (also an AssertionError, as in pyspacer)."""


class JobMsgTypeError(InvalidInputTypeError, AssertionError):
    """process_job was given something other than a JobMsg (also an AssertionError, as in pyspacer)."""


class UnknownStorageTypeError(InvalidInputError, AssertionError):
    """A storage type that is not one of config.STORAGE_TYPES (also an AssertionError, as in pyspacer)."""


class UnknownTrainerError(InvalidInputError, AttributeError):
    """A trainer class path whose module lacks that class (also an AttributeError, as in pyspacer)."""


class TrainerModuleNotFoundError(InvalidInputError, ModuleNotFoundError):
    """A trainer class path whose module cannot be found (also a ModuleNotFoundError, as in pyspacer)."""
