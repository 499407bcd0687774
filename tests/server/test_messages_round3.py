"""Damaged images, hard links and plain error details over real gRPC.

One server confined to one data root (plus the weights' folder). Every
refusal names the input it is about, and no reply carries a Python
exception name, a raw repr or a line break.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import struct
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from server._proto.inference import grpc_service_pb2 as ip
from server._proto.inference import grpc_service_pb2_grpc as ipg
from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pbg
from server.config import ServerConfig, add_arguments, config_from_args
from spacer_core import crop
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.testing import make_classifier
from tests.support.grpc_server import running_server

Code = grpc.StatusCode
# What a reply must never show: Python's exception names, reprs and line breaks.
INTERNALS = re.compile(
    r"UnpicklingError|ValueError|PermissionError|AttributeError|TypeError|KeyError|Details - "
    r"|object has no attribute|\n"
)
EFFICIENTNET = "spacer.extractors.efficientnet.EfficientNetExtractor"


def _noise(width: int, height: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _bmp_without_pixels(width: int, height: int) -> bytes:
    """A 24-bit BMP whose header claims width x height, followed by 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\x00" * 16


def _tiff_without_pixels(width: int, height: int) -> bytes:
    """An RGB TIFF whose one strip is said to hold 16 bytes."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 2),
        (273, 4, 8),
        (277, 3, 3),
        (278, 4, height),
        (279, 4, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 24) + b"\x00" * 16 + ifd + b"\x00" * 4


def _png_with_few_rows(width: int, height: int, rows: int) -> bytes:
    """A complete PNG file (IEND included) whose image data stops after `rows` rows."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(rows)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _damaged() -> dict[str, bytes]:
    png = _noise(300, 200, "PNG")
    jpeg = _noise(300, 200, "JPEG")
    return {
        "cut.png": png[: len(png) // 2],
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "empty-pixels.bmp": _bmp_without_pixels(2000, 2000),
        "empty-pixels.tiff": _tiff_without_pixels(2000, 2000),
        "few-rows.png": _png_with_few_rows(2000, 2000, 10),
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, efficientnet_weights):
    root = tmp_path_factory.mktemp("messages_root")
    outside = tmp_path_factory.mktemp("messages_outside")
    for name, data in _damaged().items():
        (root / name).write_bytes(data)
    (root / "good.png").write_bytes(_noise(300, 200, "PNG"))
    make_classifier(root / "clf.pkl")
    features = DataLocation("filesystem", str(root / "a.featurevector"))
    ImageFeatures.make_random([1, 2, 3], feature_dim=1280).store(features)
    secret = outside / "secret.json"
    secret.write_text('{"point_features": "not-a-list", "secret": "hunter2"}')
    os.link(secret, root / "linked.json")
    make_classifier(root / "clf-one.pkl")
    os.link(root / "clf-one.pkl", root / "clf-twin.pkl")
    config = ServerConfig(workers=2, log_level="WARNING", data_roots=(root, efficientnet_weights.path.parent))
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        extractor = pb.Extractor(
            class_path=EFFICIENTNET,
            data_locations={"weights": fs(efficientnet_weights.path)},
            data_hashes={"weights": efficientnet_weights.sha256},
        )
        yield SimpleNamespace(
            root=root,
            secret=secret,
            spacer=pbg.SpacerStub(channel),
            oip=ipg.GRPCInferenceServiceStub(channel),
            extractor=extractor,
            weights=efficientnet_weights,
        )


def fs(path: Any) -> pb.DataLocation:
    return pb.DataLocation(storage_type="filesystem", key=str(path))


def url(key: str) -> pb.DataLocation:
    return pb.DataLocation(storage_type="url", key=key)


def refusal(call: Any, request: Any) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as info:
        reply = call(request, timeout=120)
        if not hasattr(reply, "DESCRIPTOR"):
            list(reply)  # a stream
    details = info.value.details()
    assert not INTERNALS.search(details), details
    return info.value.code(), details


# ---------------------------------------------------------------- damaged images


@pytest.mark.parametrize("name", sorted(_damaged()))
def test_damaged_image_files_are_refused_naming_the_image(env, name):
    request = pb.ClassifyImageRequest(
        job_token="cut",
        extractor=env.extractor,
        rowcols=[pb.RowCol(row=10, col=10)],
        image_loc=fs(env.root / name),
        classifier_loc=fs(env.root / "clf.pkl"),
    )
    code, details = refusal(env.spacer.ClassifyImage, request)
    assert code == Code.INVALID_ARGUMENT
    assert str(env.root / name) in details and "truncated" in details, details


@pytest.mark.parametrize("name", sorted(_damaged()))
def test_damaged_inline_images_are_refused_naming_the_field(env, name):
    request = pb.ClassifyImageRequest(
        job_token="inline",
        extractor=env.extractor,
        rowcols=[pb.RowCol(row=10, col=10)],
        image_bytes=_damaged()[name],
        classifier_loc=fs(env.root / "clf.pkl"),
    )
    code, details = refusal(env.spacer.ClassifyImage, request)
    assert code == Code.INVALID_ARGUMENT
    assert details.startswith("inline: image_bytes: ") and "truncated" in details, details


def test_damaged_image_through_oip_is_refused(env):
    env.oip.RepositoryModelLoad(
        ip.RepositoryModelLoadRequest(
            model_name="effnet",
            parameters={
                "config": ip.ModelRepositoryParameter(
                    string_param=json.dumps(
                        {
                            "extractor": {
                                "class_path": EFFICIENTNET,
                                "data_locations": {
                                    "weights": {"storage_type": "filesystem", "key": str(env.weights.path)}
                                },
                                "data_hashes": {"weights": env.weights.sha256},
                            }
                        }
                    )
                )
            },
        ),
        timeout=120,
    )
    tensor = ip.ModelInferRequest.InferInputTensor
    for name, data in _damaged().items():
        request = ip.ModelInferRequest(
            model_name="effnet",
            inputs=[
                tensor(
                    name="IMAGE",
                    datatype="BYTES",
                    shape=[1],
                    contents=ip.InferTensorContents(bytes_contents=[data]),
                ),
                tensor(
                    name="POINTS",
                    datatype="INT32",
                    shape=[1, 2],
                    contents=ip.InferTensorContents(int_contents=[5, 5]),
                ),
            ],
        )
        code, details = refusal(env.oip.ModelInfer, request)
        assert code == Code.INVALID_ARGUMENT and "truncated" in details, (name, details)


def test_complete_images_still_classify(env):
    request = pb.ClassifyImageRequest(
        job_token="good",
        extractor=env.extractor,
        rowcols=[pb.RowCol(row=10, col=10)],
        image_loc=fs(env.root / "good.png"),
        classifier_loc=fs(env.root / "clf.pkl"),
    )
    reply = env.spacer.ClassifyImage(request, timeout=120)
    assert len(reply.scores) == 1


def test_strict_and_lenient_decodes_cut_the_same_patches():
    points = [(0, 0), (199, 299), (100, 150)]
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        data = _noise(300, 200, fmt)
        strict = crop.crop_patches(data, points, allow_truncated=False)
        lenient = crop.crop_patches(data, points, allow_truncated=True)
        assert np.array_equal(strict, lenient), fmt
        assert crop.decode_image(data, allow_truncated=False).complete


def test_library_keeps_decoding_truncated_images_when_allowed():
    data = _damaged()["cut.jpg"]
    assert not crop.decode_image(data, allow_truncated=True).complete
    assert crop.crop_patches(data, [(5, 5)], allow_truncated=True).shape == (1, 224, 224, 3)
    for name, damaged in _damaged().items():
        with pytest.raises(crop.ImageDecodeError, match=f"^{name}: .*truncated"):
            crop.crop_patches(damaged, [(5, 5)], image_key=name, allow_truncated=False)


# ---------------------------------------------------------------- hard links


def test_a_hard_link_to_an_outside_file_is_not_read(env):
    for call, request, field in (
        (
            env.spacer.ClassifyFeatures,
            pb.ClassifyFeaturesRequest(
                feature_loc=fs(env.root / "linked.json"), classifier_loc=fs(env.root / "clf.pkl")
            ),
            "feature_loc",
        ),
        (
            env.spacer.LoadModel,
            pb.LoadModelRequest(classifier_loc=fs(env.root / "linked.json")),
            "classifier_loc",
        ),
        (
            env.spacer.LoadModel,
            pb.LoadModelRequest(classifier_loc=fs(env.root / "clf-twin.pkl")),
            "classifier_loc",
        ),
    ):
        code, details = refusal(call, request)
        assert code == Code.PERMISSION_DENIED, details
        assert details.startswith(f"{field}: ") and "more than one hard link" in details, details
        assert "hunter2" not in details and "point_features" not in details
    assert env.secret.read_text().startswith('{"point_features"')


def test_hard_links_are_read_when_the_operator_allows_them(tmp_path):
    make_classifier(tmp_path / "clf.pkl")
    os.link(tmp_path / "clf.pkl", tmp_path / "twin.pkl")
    config = ServerConfig(workers=1, log_level="WARNING", data_roots=(tmp_path,), allow_hard_links=True)
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pbg.SpacerStub(channel)
        stub.LoadModel(pb.LoadModelRequest(classifier_loc=fs(tmp_path / "twin.pkl")), timeout=120)


def test_allow_hard_links_setting_is_read_from_flag_and_environment():
    def parsed(argv: list[str], environ: dict[str, str]) -> ServerConfig:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return config_from_args(parser.parse_args(argv), environ)

    assert parsed(["--allow-hard-links"], {}).allow_hard_links is True
    assert parsed([], {"SPACER_ALLOW_HARD_LINKS": "1"}).allow_hard_links is True
    assert parsed([], {}).allow_hard_links is False


# ---------------------------------------------------------------- plain details that name the field


def test_files_that_are_not_classifiers_name_the_classifier_field(env):
    features = env.root / "a.featurevector"
    for key in (features, env.root / "good.png"):
        request = pb.ClassifyFeaturesRequest(feature_loc=fs(features), classifier_loc=fs(key))
        code, details = refusal(env.spacer.ClassifyFeatures, request)
        assert code == Code.INVALID_ARGUMENT
        assert (
            details
            == f"classifier_loc: {key}: cannot load classifier: not a classifier file (unreadable pickle)."
        )


def test_previous_model_that_is_not_a_classifier_names_its_index(env):
    features = env.root / "a.featurevector"
    images = pb.ImageLabels(
        images=[
            pb.ImageAnnotations(
                feature_loc=fs(features),
                annotations=[pb.Annotation(row=1, col=1, label=pb.Label(id=1 + i % 2)) for i in range(3)],
            )
        ]
    )
    request = pb.TrainClassifierRequest(
        job_token="prev",
        nbr_epochs=1,
        clf_type="LR",
        labels=pb.TrainingTaskLabels(train=images, ref=images, val=images),
        previous_model_locs=[fs(env.root / "clf.pkl"), fs(features)],
        model_loc=fs(env.root / "out" / "m.pkl"),
        valresult_loc=fs(env.root / "out" / "v.json"),
    )
    code, details = refusal(env.spacer.TrainClassifier, request)
    assert code == Code.INVALID_ARGUMENT
    assert details.startswith(f"prev: previous_model_locs[1]: {features}: cannot load classifier"), details


def test_empty_training_set_names_the_field(env):
    empty = pb.ImageLabels()
    full = pb.ImageLabels(
        images=[
            pb.ImageAnnotations(
                feature_loc=fs(env.root / "a.featurevector"),
                annotations=[pb.Annotation(row=1, col=1, label=pb.Label(id=1))],
            )
        ]
    )
    for train, ref, val, field in (
        (empty, full, full, "train"),
        (full, empty, full, "ref"),
        (full, full, empty, "val"),
    ):
        request = pb.TrainClassifierRequest(
            job_token="t",
            nbr_epochs=1,
            clf_type="LR",
            labels=pb.TrainingTaskLabels(train=train, ref=ref, val=val),
            model_loc=fs(env.root / "out" / "m.pkl"),
            valresult_loc=fs(env.root / "out" / "v.json"),
        )
        code, details = refusal(env.spacer.TrainClassifier, request)
        assert code == Code.INVALID_ARGUMENT
        assert details.startswith(f"t: labels.{field}: no annotated images"), details


@pytest.mark.parametrize(
    "key,why",
    [
        ("/etc/passwd", "the URL has no scheme"),
        ("reef.jpg", "the URL has no scheme"),
        ("http:///etc", "the URL has no host"),
        ("http://", "the URL has no host"),
        ("http://example.com:port/x", "the URL's port is not a number"),
    ],
)
def test_malformed_urls_are_invalid_argument_naming_the_field(env, key, why):
    request = pb.ClassifyFeaturesRequest(feature_loc=url(key), classifier_loc=fs(env.root / "clf.pkl"))
    code, details = refusal(env.spacer.ClassifyFeatures, request)
    assert code == Code.INVALID_ARGUMENT
    assert details.startswith(f"feature_loc: Failed to download from the URL '{key}': {why}"), details
    request = pb.ClassifyImageRequest(
        job_token="u",
        extractor=env.extractor,
        rowcols=[pb.RowCol(row=1, col=1)],
        image_loc=url(key),
        classifier_loc=fs(env.root / "clf.pkl"),
    )
    code, details = refusal(env.spacer.ClassifyImage, request)
    assert code == Code.INVALID_ARGUMENT and details.startswith("u: image_loc: Failed to download"), details


def test_refused_url_details_carry_no_python_exception(env):
    request = pb.ClassifyFeaturesRequest(
        feature_loc=url("http://127.0.0.1:1/x"), classifier_loc=fs(env.root / "clf.pkl")
    )
    code, details = refusal(env.spacer.ClassifyFeatures, request)
    assert code == Code.PERMISSION_DENIED and details.startswith("feature_loc: Refused to download"), details


def test_run_job_field_of_the_wrong_type_gives_a_plain_message(env):
    job = {
        "task_name": "extract_features",
        "tasks": [
            {
                "job_token": "j",
                "extractor": {"class_path": EFFICIENTNET, "data_locations": [1]},
                "rowcols": [[1, 1]],
                "image_loc": {"storage_type": "filesystem", "key": str(env.root / "good.png")},
                "feature_loc": {"storage_type": "filesystem", "key": str(env.root / "o.featurevector")},
            }
        ],
    }
    code, details = refusal(env.spacer.RunJob, pb.RunJobRequest(job_msg_json=json.dumps(job)))
    assert code == Code.INVALID_ARGUMENT
    assert details.endswith("tasks[0] (ExtractFeaturesMsg): a field has the wrong type or value."), details


def _infer(env: SimpleNamespace, image: Any, shape: list[int]) -> ip.ModelInferRequest:
    tensor = ip.ModelInferRequest.InferInputTensor
    return ip.ModelInferRequest(
        model_name="effnet",
        inputs=[
            image,
            tensor(
                name="POINTS",
                datatype="INT32",
                shape=shape,
                contents=ip.InferTensorContents(int_contents=[1, 1]),
            ),
        ],
    )


def test_oip_image_path_errors_name_the_input(env):
    test_damaged_image_through_oip_is_refused(env)  # loads "effnet"
    tensor = ip.ModelInferRequest.InferInputTensor
    for path, status in (
        ("/etc/passwd", Code.PERMISSION_DENIED),
        (str(env.root / "nope.jpg"), Code.NOT_FOUND),
        (str(env.root / "cut.png"), Code.INVALID_ARGUMENT),
    ):
        image = tensor(
            name="IMAGE_PATH",
            datatype="BYTES",
            shape=[1],
            contents=ip.InferTensorContents(bytes_contents=[path.encode()]),
        )
        code, details = refusal(env.oip.ModelInfer, _infer(env, image, [1, 2]))
        assert code == status, details
        # Storage errors name the input; a decode error names the image by its path.
        assert details.startswith("input 'IMAGE_PATH': " if status != Code.INVALID_ARGUMENT else path), (
            details
        )


def test_oip_negative_shape_says_what_was_sent(env):
    image = ip.ModelInferRequest.InferInputTensor(
        name="IMAGE",
        datatype="BYTES",
        shape=[1],
        contents=ip.InferTensorContents(bytes_contents=[(env.root / "good.png").read_bytes()]),
    )
    code, details = refusal(env.oip.ModelInfer, _infer(env, image, [-1, 2]))
    assert code == Code.INVALID_ARGUMENT
    assert "unexpected shape [-1,2] for input 'POINTS'" in details and "actual size" in details, details


def test_feature_file_dir_is_named(env):
    request = pb.ClassifyFeaturesRequest(feature_loc=fs(env.root), classifier_loc=fs(env.root / "clf.pkl"))
    code, details = refusal(env.spacer.ClassifyFeatures, request)
    assert code == Code.INVALID_ARGUMENT and details.startswith("feature_loc: "), details


def test_run_job_refuses_a_truncated_image(env):
    job = {
        "task_name": "extract_features",
        "tasks": [
            {
                "job_token": "cutjob",
                "extractor": {
                    "class_path": EFFICIENTNET,
                    "data_locations": {
                        "weights": {"storage_type": "filesystem", "key": str(env.weights.path)}
                    },
                    "data_hashes": {"weights": env.weights.sha256},
                },
                "rowcols": [[5, 5]],
                "image_loc": {"storage_type": "filesystem", "key": str(env.root / "cut.png")},
                "feature_loc": {"storage_type": "filesystem", "key": str(env.root / "cut.featurevector")},
            }
        ],
    }
    reply = env.spacer.RunJob(pb.RunJobRequest(job_msg_json=json.dumps(job)), timeout=120)
    assert not reply.ok and "truncated" in reply.error_message, reply
    assert not (env.root / "cut.featurevector").exists()
