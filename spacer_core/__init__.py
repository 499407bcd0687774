"""pyspacer-compatible library: extract point features, train and apply classifiers."""

from spacer_core._crop_rs import __version__

__all__ = ["__version__"]
