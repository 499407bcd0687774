"""DummyExtractor: random features of a chosen length, for tests and dry runs.

The class lives in `extractors.base`, where pyspacer defines it; this module
keeps its older import path working.
"""

from spacer_core.extractors.base import DummyExtractor

__all__ = ["DummyExtractor"]
