"""Pytest fixtures and test-only servers; synthetic data comes from `spacer_core.testing`."""

from pathlib import Path

# The checkout's root: benchmarks and scripts that tests run live below it.
ROOT = Path(__file__).resolve().parents[2]
