"""Shared pytest configuration; the shared fixtures are registered here, once."""

import pytest

# Fixtures every test module may ask for by name.
pytest_plugins = [
    "tests.support.http_server",
    "tests.support.s3",
    "tests.support.weights",
]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
