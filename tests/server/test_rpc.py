"""Every unary/stream RPC end to end over a real loopback server, pyspacer as oracle."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from spacer_core import config as core_config
from spacer_core.testing import extractor_json, make_classifier, make_image
from tests.support.grpc_server import running_server

spacer = pytest.importorskip("spacer")
from spacer import tasks as sp_tasks  # noqa: E402
from spacer.data_classes import DataLocation as SpLoc  # noqa: E402
from spacer.data_classes import ImageFeatures as SpFeatures  # noqa: E402
from spacer.extractors import FeatureExtractor as SpExtractor  # noqa: E402
from spacer.messages import ClassifyFeaturesMsg as SpClassifyFeaturesMsg  # noqa: E402
from spacer.messages import ClassifyImageMsg as SpClassifyImageMsg  # noqa: E402
from spacer.messages import ExtractFeaturesMsg as SpExtractMsg  # noqa: E402

from spacer_core.testing import fs_loc as fs  # noqa: E402

ROWCOLS = [(10, 12), (40, 60), (71, 95)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("rpc")
    image = make_image(root / "reef.jpg", 96, 72, seed=1)
    clf = make_classifier(root / "clf.pkl")
    extractor = extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)
    return {"root": root, "image": image, "clf": clf, "extractor": extractor}


@pytest.fixture(scope="module")
def client():
    with running_server(workers=2) as server, SpacerClient(server.address, timeout=120) as c:
        yield c


def pyspacer_classify(data, rowcols):
    msg = SpClassifyImageMsg(
        job_token="oracle",
        extractor=SpExtractor.deserialize(data["extractor"]),
        rowcols=rowcols,
        image_loc=SpLoc(**fs(data["image"])),
        classifier_loc=SpLoc(**fs(data["clf"])),
    )
    return sp_tasks.classify_image(msg)


def assert_scores_match(response: pb.ClassifyResponse, oracle) -> None:
    assert [c.id for c in response.classes] == oracle.classes
    assert len(response.scores) == len(oracle.scores)
    for ours, (row, col, probs) in zip(response.scores, oracle.scores):
        assert (ours.row, ours.col) == (row, col)
        np.testing.assert_allclose(ours.scores, probs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_classify_image_inline_and_by_location_match_pyspacer(client, data):
    oracle = pyspacer_classify(data, ROWCOLS)
    inline = client.classify_image(
        data["extractor"], ROWCOLS, data["image"], fs(data["clf"]), job_token="img-1"
    )
    assert inline.job_token == "img-1"
    assert inline.valid_rowcol is True
    assert_scores_match(inline, oracle)
    by_loc = client.classify_image(data["extractor"], ROWCOLS, fs(data["image"]), fs(data["clf"]))
    assert_scores_match(by_loc, oracle)


@pytest.mark.slow
def test_extract_features_stores_pyspacer_readable_file_and_returns_it_inline(client, data):
    ours_loc = data["root"] / "ours.featurevector"
    response = client.extract_features(
        data["extractor"],
        ROWCOLS,
        data["image"],
        fs(ours_loc),
        return_features=True,
        job_token="ext-1",
    )
    oracle_loc = data["root"] / "oracle.featurevector"
    sp_tasks.extract_features(
        SpExtractMsg(
            job_token="oracle",
            extractor=SpExtractor.deserialize(data["extractor"]),
            rowcols=ROWCOLS,
            image_loc=SpLoc(**fs(data["image"])),
            feature_loc=SpLoc(**fs(oracle_loc)),
        )
    )
    stored = SpFeatures.load(SpLoc(**fs(ours_loc)))
    oracle = SpFeatures.load(SpLoc(**fs(oracle_loc)))
    assert stored.valid_rowcol and stored.npoints == 3 and stored.feature_dim == 1280
    for ours_pf, oracle_pf in zip(stored.point_features, oracle.point_features):
        assert (ours_pf.row, ours_pf.col) == (oracle_pf.row, oracle_pf.col)
        np.testing.assert_allclose(ours_pf.data, oracle_pf.data, atol=1e-4, rtol=0)

    inline = response.features
    assert inline.npoints == 3 and inline.feature_dim == 1280 and inline.valid_rowcol
    for pf, stored_pf in zip(inline.point_features, stored.point_features):
        assert (pf.row, pf.col) == (stored_pf.row, stored_pf.col)
        np.testing.assert_allclose(pf.data, stored_pf.data, rtol=1e-6, atol=1e-6)
    assert response.runtime > 0


@pytest.mark.slow
def test_extract_features_without_feature_loc_returns_features_only(client, data):
    response = client.extract_features(data["extractor"], ROWCOLS[:1], data["image"], return_features=True)
    assert len(response.features.point_features) == 1
    assert len(response.features.point_features[0].data) == 1280
    with pytest.raises(grpc.RpcError) as err:
        client.extract_features(data["extractor"], ROWCOLS[:1], data["image"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feature_loc" in err.value.details()


def _random_features(root, name, rowcols, seed):
    """A pyspacer-written feature file with random 1280-d features."""
    rng = np.random.default_rng(seed)
    from spacer.data_classes import PointFeatures

    features = SpFeatures(
        point_features=[PointFeatures(r, c, rng.normal(size=1280)) for r, c in rowcols],
        valid_rowcol=True,
        feature_dim=1280,
        npoints=len(rowcols),
    )
    loc = SpLoc(**fs(root / name))
    features.store(loc)
    return loc


def test_classify_features_matches_pyspacer(client, data):
    feature_loc = _random_features(data["root"], "random.featurevector", ROWCOLS, seed=3)
    oracle = sp_tasks.classify_features(
        SpClassifyFeaturesMsg("oracle", feature_loc, SpLoc(**fs(data["clf"])))
    )
    response = client.classify_features(feature_loc.serialize(), fs(data["clf"]), job_token="cf")
    assert response.job_token == "cf"
    assert_scores_match(response, oracle)


def _labels(root, n_images, seed):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        rowcols = [(int(r), int(c)) for r, c in rng.integers(0, 500, (6, 2))]
        loc = _random_features(root, f"train{seed}_{i}.featurevector", rowcols, seed=100 + i)
        labels = [int(x) for x in rng.integers(1, 4, len(rowcols))]
        images.append((loc, [(r, c, lab) for (r, c), lab in zip(rowcols, labels)]))
    return images


def _train_request(root, images, epochs):
    def image_labels(subset):
        return pb.ImageLabels(
            images=[
                pb.ImageAnnotations(
                    feature_loc=pb.DataLocation(storage_type="filesystem", key=loc.key),
                    annotations=[pb.Annotation(row=r, col=c, label=pb.Label(id=lab)) for r, c, lab in anns],
                )
                for loc, anns in subset
            ]
        )

    return pb.TrainClassifierRequest(
        job_token="train-1",
        trainer="minibatch",
        nbr_epochs=epochs,
        clf_type="LR",
        labels=pb.TrainingTaskLabels(
            train=image_labels(images[:12]), ref=image_labels(images[12:16]), val=image_labels(images[16:])
        ),
        model_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "model.pkl")),
        valresult_loc=pb.DataLocation(storage_type="filesystem", key=str(root / "valres.json")),
    )


def test_train_classifier_streams_progress_then_result(client, data):
    from spacer.data_classes import ImageLabels
    from spacer.messages import TrainClassifierMsg, TrainingTaskLabels
    from spacer.storage import load_classifier

    root = data["root"]
    images = _labels(root, 20, seed=5)
    events = list(client.train_classifier(_train_request(root, images, epochs=3)))
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [p.epoch for p in progress] == [1, 2, 3]
    assert all(p.nbr_epochs == 3 and p.elapsed >= 0 for p in progress)
    assert len(results) == 1 and events[-1].WhichOneof("event") == "result"
    result = results[0]
    assert list(result.ref_accs) == pytest.approx([p.ref_accuracy for p in progress])
    assert result.model_loc.key == str(root / "model.pkl")
    assert load_classifier(SpLoc(**fs(root / "model.pkl"))).classes_.tolist() == [1, 2, 3]
    assert json.loads((root / "valres.json").read_text())["classes"] == [1, 2, 3]

    oracle = sp_tasks.train_classifier(
        TrainClassifierMsg(
            job_token="oracle",
            trainer="minibatch",
            nbr_epochs=3,
            clf_type="LR",
            labels=TrainingTaskLabels(
                train=ImageLabels(dict(images[:12])),
                ref=ImageLabels(dict(images[12:16])),
                val=ImageLabels(dict(images[16:])),
            ),
            previous_model_locs=[],
            model_loc=SpLoc(**fs(root / "oracle_model.pkl")),
            valresult_loc=SpLoc(**fs(root / "oracle_valres.json")),
        )
    )
    assert result.acc == pytest.approx(oracle.acc, abs=0.01)
    assert list(result.ref_accs) == pytest.approx(oracle.ref_accs, abs=0.01)


def test_train_classifier_rejects_bad_requests_before_training(client, data):
    request = _train_request(data["root"], _labels(data["root"], 20, seed=6), epochs=0)
    with pytest.raises(grpc.RpcError) as err:
        list(client.train_classifier(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nbr_epochs" in err.value.details()


def test_run_job_returns_pyspacer_job_return_json(client, data):
    from spacer.messages import JobMsg, JobReturnMsg

    feature_loc = _random_features(data["root"], "job.featurevector", ROWCOLS, seed=8)
    job = JobMsg(
        task_name="classify_features",
        tasks=[SpClassifyFeaturesMsg("job-1", feature_loc, SpLoc(**fs(data["clf"])))],
    )
    returned = client.run_job(job)
    assert returned["ok"] is True
    oracle = sp_tasks.process_job(job)
    parsed = JobReturnMsg.deserialize(returned)
    np.testing.assert_allclose(
        [s for _, _, s in parsed.results[0].scores], [s for _, _, s in oracle.results[0].scores], atol=1e-4
    )

    missing = JobMsg(
        task_name="classify_features",
        tasks=[
            SpClassifyFeaturesMsg("job-2", SpLoc(**fs(data["root"] / "nope.fv")), SpLoc(**fs(data["clf"])))
        ],
    )
    failed = client.run_job(missing)
    assert failed["ok"] is False and "nope.fv" in failed["error_message"]


def test_run_job_rejects_text_that_is_not_a_job(client):
    for text in ("{not json", "[1, 2]", '{"task_name": "classify_features"}'):
        with pytest.raises(grpc.RpcError) as err:
            client.run_job(text)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, text


def requested_models(client) -> list:
    """ListModels' entries loaded by LoadModel (calls before this one loaded others on their way)."""
    return [m for m in client.list_models() if m.loaded_by != "call"]


def test_load_and_list_models(client, data):
    assert requested_models(client) == []
    clf = client.load_model(classifier_loc=fs(data["clf"]))
    assert clf.kind == "classifier" and [c.id for c in clf.classes] == [1, 2, 3]
    assert clf.feature_dim == 1280
    ext = client.load_model(extractor=data["extractor"])
    assert ext.kind == "extractor" and ext.feature_dim == 1280
    assert sorted(m.kind for m in requested_models(client)) == ["classifier", "extractor"]
    assert {m.loaded_by for m in requested_models(client)} == {"load_model"}
    with pytest.raises(grpc.RpcError) as err:
        client.load_model(classifier_loc=fs(data["root"] / "missing.pkl"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "missing.pkl" in err.value.details()


@pytest.mark.slow
def test_s3_locations_end_to_end(client, data, s3_bucket):
    import boto3

    from tests.support.s3 import s3_env

    env = s3_env(core_config.AWS_ENDPOINT_URL)
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    s3.upload_file(str(data["image"]), s3_bucket, "images/reef.jpg")
    s3.upload_file(str(data["clf"]), s3_bucket, "models/clf.pkl")

    def s3_loc(key):
        return {"storage_type": "s3", "key": key, "bucket_name": s3_bucket}

    local = client.classify_image(data["extractor"], ROWCOLS, fs(data["image"]), fs(data["clf"]))
    remote = client.classify_image(
        data["extractor"], ROWCOLS, s3_loc("images/reef.jpg"), s3_loc("models/clf.pkl")
    )
    for a, b in zip(remote.scores, local.scores):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)

    client.extract_features(data["extractor"], ROWCOLS, s3_loc("images/reef.jpg"), s3_loc("features/reef.fv"))
    by_features = client.classify_features(s3_loc("features/reef.fv"), s3_loc("models/clf.pkl"))
    for a, b in zip(by_features.scores, local.scores):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)

    with pytest.raises(grpc.RpcError) as err:
        client.classify_features(s3_loc("features/absent.fv"), s3_loc("models/clf.pkl"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "absent.fv" in err.value.details()


@pytest.mark.slow
def test_unbatched_mode_calls_the_library_per_image_and_matches_pyspacer(data):
    oracle = pyspacer_classify(data, ROWCOLS)
    with running_server(batching=False) as server, SpacerClient(server.address, timeout=120) as c:
        result = c.classify_image(data["extractor"], ROWCOLS, data["image"], fs(data["clf"]))
        stored = data["root"] / "unbatched.featurevector"
        c.extract_features(data["extractor"], ROWCOLS, fs(data["image"]), fs(stored))
    assert_scores_match(result, oracle)
    assert SpFeatures.load(SpLoc(**fs(stored))).npoints == len(ROWCOLS)
