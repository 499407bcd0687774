"""NetworkSpec: what an extractor hands the inference layer to run its network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class NetworkSpec:
    """A feature network: its identity, its output size and how to build it.

    `key` is the sha256 of the files that define the network, so compiled
    forms are cached per content. `build()` returns a module mapping float32
    (N, 3, 224, 224) patches in [0, 1] to (N, feature_dim) features; it is
    only called when no compiled form is cached. `label` names the network's
    files in messages.
    """

    key: str
    feature_dim: int
    build: Callable[[], nn.Module] = field(compare=False, repr=False)
    label: str = field(default="", compare=False)
