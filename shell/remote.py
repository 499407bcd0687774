"""The survey workflow's network and training calls sent to a running `spacer serve`.

`RemoteRunner` has the methods of `spacer_core.survey.workflow.LocalRunner`,
so the same workflow runs in process or on a server: one more engine. Images
go inline; weights, feature files and classifiers are named by path, so the
server must be able to reach them (its data roots).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.client import SpacerClient, pb, to_location
from spacer_core.messages import TrainClassifierReturnMsg
from spacer_core.survey import workflow as survey
from spacer_core.survey.workflow import SurveyError


class RemoteRunner:
    """The survey steps on a running `spacer serve` at `client.address`."""

    def __init__(self, client: SpacerClient):
        self.client = client

    def extract(
        self, extractor: Any, image: Path, rowcols: Sequence[tuple[int, int]], feature_file: Path
    ) -> None:
        self.client.extract_features(extractor, rowcols, image, survey.local(feature_file))

    def train(
        self, labels: Any, model_file: Path, valresult_file: Path, clf_type: str, epochs: int, progress: Any
    ) -> TrainClassifierReturnMsg:
        def image_labels(which: Any) -> Any:
            return pb.ImageLabels(
                images=[
                    pb.ImageAnnotations(
                        feature_loc=to_location(loc),
                        annotations=[pb.Annotation(row=r, col=c, label=_label(v)) for r, c, v in points],
                    )
                    for loc, points in which.items()
                ]
            )

        request = pb.TrainClassifierRequest(
            job_token=model_file.name,
            trainer="minibatch",
            nbr_epochs=epochs,
            clf_type=clf_type,
            labels=pb.TrainingTaskLabels(
                train=image_labels(labels.train), ref=image_labels(labels.ref), val=image_labels(labels.val)
            ),
            model_loc=to_location(survey.local(model_file)),
            valresult_loc=to_location(survey.local(valresult_file)),
        )
        for event in self.client.train_classifier(request):
            if event.HasField("progress") and progress is not None:
                # The stream counts epochs from 1; the library's callback from 0.
                progress(event.progress.epoch - 1, event.progress.ref_accuracy, event.progress.elapsed)
            elif event.HasField("result"):
                r = event.result
                return TrainClassifierReturnMsg(r.acc, list(r.pc_accs), list(r.ref_accs), r.runtime)
        raise SurveyError(f"{self.client.address}: training ended without a result")

    def classify(
        self, extractor: Any, image: Path, rowcols: Sequence[tuple[int, int]], classifier_file: Path
    ) -> tuple[list[Any], list[list[float]]]:
        response = self.client.classify_image(extractor, rowcols, image, survey.local(classifier_file))
        classes = [c.id if c.WhichOneof("value") == "id" else c.name for c in response.classes]
        return classes, [list(p.scores) for p in response.scores]


def _label(value: Any) -> Any:
    return pb.Label(id=value) if isinstance(value, int) else pb.Label(name=str(value))


def runner(address: str | None) -> tuple[survey.Runner, SpacerClient | None]:
    """The engine for `--server ADDR` (and its client, to close), or the in-process one."""
    if not address:
        return survey.LocalRunner(), None
    client = SpacerClient(address)
    return RemoteRunner(client), client
