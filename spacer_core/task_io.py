"""What tasks exchange with extractors and trainers: training labels and their results.

Extractors and trainers build these; `spacer_core.messages` re-exports them
under pyspacer's names, so neither has to import the messages module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spacer_core.data_classes import DataClass, ImageLabels


class ExtractFeaturesReturnMsg(DataClass):
    """Output of extract_features."""

    def __init__(self, extractor_loaded_remotely: bool, runtime: float):
        self.extractor_loaded_remotely = extractor_loaded_remotely
        self.runtime = runtime

    @classmethod
    def example(cls) -> ExtractFeaturesReturnMsg:
        return cls(extractor_loaded_remotely=True, runtime=2.1)

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> ExtractFeaturesReturnMsg:
        return cls(extractor_loaded_remotely=data["extractor_loaded_remotely"], runtime=data["runtime"])


_SET_NAMES = ("train", "ref", "val")


@dataclasses.dataclass
class TrainingTaskLabels:
    """The three annotation sets of a training task.

    train: what the classifier learns from; ref: held out, scored every
    epoch and used to calibrate (should fit in one training batch); val:
    scores the finished classifier. ``task_utils.preprocess_labels`` builds
    this from one ImageLabels.
    """

    train: ImageLabels
    ref: ImageLabels
    val: ImageLabels

    def __getitem__(self, item: str) -> ImageLabels:
        if item not in _SET_NAMES:
            raise KeyError(item)
        return getattr(self, item)  # type: ignore[no-any-return]

    def __setitem__(self, item: str, value: ImageLabels) -> None:
        if item not in _SET_NAMES:
            raise KeyError(item)
        setattr(self, item, value)

    @property
    def label_count(self) -> int:
        return self.train.label_count + self.ref.label_count + self.val.label_count

    @property
    def has_remote_data(self) -> bool:
        return self.train.has_remote_data or self.ref.has_remote_data or self.val.has_remote_data

    def set_filesystem_cache(self, dir_path: str | None) -> None:
        for name in _SET_NAMES:
            self[name].set_filesystem_cache(dir_path)

    def serialize(self) -> dict[str, Any]:
        return {name: self[name].serialize() for name in _SET_NAMES}

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> TrainingTaskLabels:
        return cls(**{name: ImageLabels.deserialize(data[name]) for name in _SET_NAMES})

    @classmethod
    def example(cls) -> TrainingTaskLabels:
        return cls(train=ImageLabels.example(), ref=ImageLabels.example(), val=ImageLabels.example())


class TrainClassifierReturnMsg(DataClass):
    """Output of train_classifier: accuracies and runtime."""

    def __init__(self, acc: float, pc_accs: list[float], ref_accs: list[float], runtime: float):
        self.acc = acc
        self.pc_accs = pc_accs
        self.ref_accs = ref_accs
        self.runtime = runtime

    @classmethod
    def example(cls) -> TrainClassifierReturnMsg:
        return cls(acc=0.7, pc_accs=[0.4, 0.5, 0.6], ref_accs=[0.55, 0.65, 0.64, 0.67, 0.70], runtime=123.4)

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> TrainClassifierReturnMsg:
        return cls(
            acc=data["acc"], pc_accs=data["pc_accs"], ref_accs=data["ref_accs"], runtime=data["runtime"]
        )
