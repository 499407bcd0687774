"""VGG16 without Caffe: Caffe files read with protobuf, run in PyTorch, checked against NumPy.

pyspacer's VGG16CaffeExtractor needs Caffe, which is not installed here, so
the oracle is pyspacer's own preprocessing (its crop and its Transformer:
BGR, mean 128) followed by an independent NumPy implementation of Caffe's
layers (spacer_core/weights/caffe_synthetic.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spacer_core.caffe import CaffeModelError, build_caffe_network, output_size, parse_weights, pooled_size
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import HashMismatchError, PreconditionError
from spacer_core.extractors import VGG16CaffeExtractor
from spacer_core.extractors.vgg16 import build_vgg16_network, combined_sha256
from spacer_core.inference import load_backend
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.weights.caffe_synthetic import (
    Enum,
    Layer,
    conv,
    in_place,
    inner_product,
    numpy_forward,
    prototxt,
    vgg16_layers,
    write_net,
)

ROOT = Path(__file__).resolve().parents[2]
POINTS = [(0, 0), (60, 200), (150, 99), (299, 319), (150, 99)]


def _small_net(seed: int = 0) -> list[Layer]:
    """Every supported layer kind, with shapes where Caffe's pooling rounds up and clips."""
    rng = np.random.default_rng(seed)
    return [
        conv("conv1_1", "data", 3, 4, rng, kernel=5, stride=3, pad=2, gain=1 / 128),  # -> 75x75
        in_place("relu1_1", "ReLU", "conv1_1", negative_slope=0.1),
        Layer(
            "pool1",
            "Pooling",
            ["conv1_1"],
            ["pool1"],  # ceil((75-2)/2)+1 = 38 (floor gives 37)
            {"pooling_param": {"pool": Enum("MAX"), "kernel_size": 2, "stride": 2}},
        ),
        conv("conv2", "pool1", 4, 6, rng, kernel=3, stride=2, group=2, pad_h=1, pad_w=0),  # -> 19x18
        in_place("relu2", "ReLU", "conv2"),
        Layer(
            "pool2",
            "Pooling",
            ["conv2"],
            ["pool2"],  # partial windows at the edges -> 10x10
            {"pooling_param": {"pool": Enum("AVE"), "kernel_size": 3, "stride": 2, "pad": 1}},
        ),
        # Included in TRAIN only: would scale fc6 by 0.1 if it ran at test time.
        Layer(
            "train_noise",
            "Dropout",
            ["pool2"],
            ["pool2"],
            {"dropout_param": {"dropout_ratio": 0.9, "scale_train": False}},
            extra={"include": {"phase": Enum("TRAIN")}},
        ),
        inner_product("fc6", "pool2", 6 * 10 * 10, 32, rng),
        in_place("relu6", "ReLU", "fc6"),
        in_place("drop6", "Dropout", "fc6", dropout_ratio=0.5),
        inner_product("fc7", "fc6", 32, 16, rng),
        in_place("relu7", "ReLU", "fc7"),
        # Applies its ratio at test time: fc7 is read after this layer ran.
        in_place("drop7", "Dropout", "fc7", dropout_ratio=0.25, scale_train=False),
        inner_product("fc8", "fc7", 16, 5, rng),
        Layer("prob", "Softmax", ["fc8"], ["prob"]),
    ]


def _image(seed: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (300, 320, 3), dtype=np.uint8))


def _pyspacer_input(im: Image.Image, points: list[tuple[int, int]]) -> np.ndarray:
    """pyspacer's own crop and VGG16 preprocessing (BGR, minus 128, CHW)."""
    from spacer.extractors.utils import crop_patches
    from spacer.extractors.vgg16 import Transformer

    transformer = Transformer((128, 128, 128))
    return np.stack([transformer.preprocess(p) for p in crop_patches(im, points, 224)])


def _extractor(definition: Path, weights: Path, hashes: dict[str, str] | None = None) -> VGG16CaffeExtractor:
    return VGG16CaffeExtractor(
        data_locations={
            "definition": DataLocation("filesystem", str(definition)),
            "weights": DataLocation("filesystem", str(weights)),
        },
        data_hashes=hashes or None,
    )


@pytest.fixture(autouse=True)
def active_runtime(tmp_path, monkeypatch):
    # A runtime of this test's own; compiled artifacts go to this test's folder.
    from spacer_core import config

    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", str(tmp_path / "cache"))
    active = Runtime(RuntimeSettings(device="cpu"))
    with active.activate():
        yield active
    active.close()


@pytest.mark.parametrize("generation", ["layer", "layers"])
def test_small_net_matches_numpy_caffe(tmp_path, generation):
    layers = _small_net()
    definition, weights = write_net(tmp_path, "small", layers, generation)
    im = _image()
    reference = numpy_forward(layers, _pyspacer_input(im, POINTS), "fc7")
    assert reference.shape == (len(POINTS), 16) and reference.std() > 0.05

    extractor = _extractor(definition, weights)
    features, msg = extractor(im, POINTS)
    got = np.array([pf.data for pf in features.point_features])
    assert got.shape == reference.shape
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)
    assert [(pf.row, pf.col) for pf in features.point_features] == POINTS
    assert msg.extractor_loaded_remotely is False


def test_softmax_and_other_blobs_match_numpy(tmp_path):
    layers = _small_net(seed=5)
    definition, weights = write_net(tmp_path, "small", layers)
    batch = _pyspacer_input(_image(7), POINTS[:3])
    x = torch.from_numpy((batch[:, ::-1] + 128) / 255).float()  # back to ToTensor RGB
    for blob in ("prob", "pool1", "fc6"):
        net = build_caffe_network(definition.read_bytes(), weights.read_bytes(), "small", output_blob=blob)
        with torch.inference_mode():
            got = net(x).numpy()
        np.testing.assert_allclose(got, numpy_forward(layers, batch, blob), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1) > 0, True)


@pytest.mark.slow
def test_default_backend_matches_eager_and_caches_per_file_pair(tmp_path, active_runtime):
    layers = _small_net(seed=2)
    definition, weights = write_net(tmp_path, "small", layers)
    d, w = definition.read_bytes(), weights.read_bytes()
    extractor = _extractor(definition, weights)
    spec, loaded_remotely = extractor.network()
    sha = hashlib.sha256(f"caffe:{hashlib.sha256(d).hexdigest()}:{hashlib.sha256(w).hexdigest()}".encode())
    assert (
        spec.key
        == sha.hexdigest()
        == combined_sha256(hashlib.sha256(d).hexdigest(), hashlib.sha256(w).hexdigest())
    )
    assert spec.feature_dim == 16 and loaded_remotely is False
    assert str(definition) in spec.label and str(weights) in spec.label

    eager = load_backend(spec.key, lambda: build_vgg16_network(d, w, "small"), device="cpu", kind="eager")
    batch = (np.random.default_rng(0).integers(0, 256, (4, 3, 224, 224)) / 255).astype(np.float32)
    compiled = active_runtime.backend(spec)
    np.testing.assert_allclose(compiled.run(batch), eager.run(batch), rtol=0, atol=1e-4)
    onnx = load_backend(
        spec.key,
        lambda: build_caffe_network(d, w, "small"),
        device="cpu",
        kind="onnxruntime",
        cache_dir=tmp_path / "compiled",
    )
    assert onnx.name == "onnxruntime"
    np.testing.assert_allclose(onnx.run(batch), eager.run(batch), rtol=0, atol=1e-4)

    # The runtime keeps the network under both files' hashes: another
    # definition with the same weights gets its own network.
    assert active_runtime.backend(extractor.network()[0]) is compiled
    other = tmp_path / "other.prototxt"
    other.write_text(definition.read_text().replace("negative_slope: 0.1", "negative_slope: 0.2"))
    other_spec = _extractor(other, weights).network()[0]
    assert other_spec.key != spec.key
    assert active_runtime.backend(other_spec) is not compiled


def test_data_hashes_are_checked(tmp_path):
    definition, weights = write_net(tmp_path, "small", _small_net())
    good = {
        "definition": hashlib.sha256(definition.read_bytes()).hexdigest(),
        "weights": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    _extractor(definition, weights, good).network()
    with pytest.raises(HashMismatchError, match="'weights'"):
        _extractor(definition, weights, {**good, "weights": "0" * 64}).network()
    with pytest.raises(HashMismatchError, match="'definition'"):
        _extractor(definition, weights, {"definition": "0" * 64}).network()


@pytest.mark.slow
def test_vgg16_layout_with_narrow_layers_matches_numpy(tmp_path):
    layers = vgg16_layers(width_divisor=16, fc_width=64, classes=10)
    definition, weights = write_net(tmp_path, "vgg16_narrow", layers)
    im = _image(11)
    reference = numpy_forward(layers, _pyspacer_input(im, POINTS[:2]), "fc7")
    features, _ = _extractor(definition, weights)(im, POINTS[:2])
    got = np.array([pf.data for pf in features.point_features])
    assert got.shape == (2, 64) and reference.std() > 0.05
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_true_size_vgg16_gives_4096_features(tmp_path):
    layers = vgg16_layers()
    definition, weights = write_net(tmp_path, "vgg16", layers)
    del layers
    net = build_caffe_network(definition.read_bytes(), weights.read_bytes(), "vgg16")
    assert net.output_shape == (4096,)
    with torch.inference_mode():
        out = net(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 4096) and torch.isfinite(out).all() and float(out.std()) > 0


def test_output_size_comes_from_the_definition(tmp_path):
    definition, _ = write_net(tmp_path, "small", _small_net())
    assert output_size(definition.read_bytes(), "small", "fc7") == 16  # after in-place ReLU and Dropout
    assert output_size(definition.read_bytes(), "small", "fc6") == 32
    assert output_size(definition.read_bytes(), "small", "pool1") is None  # needs shapes, not given here
    assert output_size(prototxt(vgg16_layers(width_divisor=16, fc_width=64, classes=10)), "v", "fc7") == 64


def test_caffe_errors_are_a_library_category(tmp_path):
    definition, _ = write_net(tmp_path, "small", _small_net())
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff")
    extractor = _extractor(definition, bad)
    with pytest.raises(CaffeModelError) as caught:
        extractor(_image(), POINTS[:1])
    assert isinstance(caught.value, PreconditionError)


def test_pooled_size_rounds_up_and_clips_as_caffe():
    assert pooled_size(75, 2, 2, 0) == 38  # rounded up
    assert pooled_size(75, 2, 2, 0, ceil=False) == 37
    assert pooled_size(224, 2, 2, 0) == 112
    assert pooled_size(4, 2, 3, 1) == 2  # a third window would start in the padding
    assert pooled_size(19, 3, 2, 1) == 10


def test_unsupported_layer_type_is_named(tmp_path):
    layers = _small_net()
    layers.insert(2, Layer("norm1", "LRN", ["conv1_1"], ["conv1_1"], {"lrn_param": {"local_size": 5}}))
    for generation in ("layer", "layers"):
        definition, weights = write_net(tmp_path / generation, "lrn", layers, generation)
        with pytest.raises(CaffeModelError, match="layer 'norm1' has type 'LRN', which is not supported"):
            build_caffe_network(definition.read_bytes(), weights.read_bytes(), "lrn")


def test_bad_files_give_clear_errors(tmp_path):
    layers = _small_net()
    definition, weights = write_net(tmp_path, "small", layers)
    d, w = definition.read_bytes(), weights.read_bytes()
    with pytest.raises(CaffeModelError, match="not a binary Caffe model|holds no layers"):
        build_caffe_network(d, b"\xff\xff\xff", "x.caffemodel")
    with pytest.raises(CaffeModelError, match="not a Caffe text-format net definition"):
        build_caffe_network(b"layer { name: ", w, "x.prototxt")
    with pytest.raises(CaffeModelError, match="no layer writes blob 'fc9'"):
        build_caffe_network(d, w, "x", output_blob="fc9")
    # Weights that lack a layer, and weights of the wrong shape.
    partial = write_net(tmp_path / "partial", "p", [layer for layer in layers if layer.name != "fc7"])[1]
    with pytest.raises(CaffeModelError, match="layer 'fc7' .*0 parameter blobs"):
        build_caffe_network(d, partial.read_bytes(), "p")
    wrong = [
        Layer(
            lay.name,
            lay.type,
            lay.bottom,
            lay.top,
            lay.params,
            [b[..., :1] if lay.name == "fc6" else b for b in lay.blobs],
        )
        for lay in layers
    ]
    with pytest.raises(CaffeModelError, match="layer 'fc6'.*weights blob has shape"):
        build_caffe_network(d, write_net(tmp_path / "w", "w", wrong)[1].read_bytes(), "w")


def test_weights_blob_shapes_are_read_in_both_forms(tmp_path):
    layers = _small_net()
    for generation in ("layer", "layers"):
        _, weights = write_net(tmp_path / generation, "small", layers, generation)
        net = parse_weights(weights.read_bytes())
        blobs = (net.layer if generation == "layer" else net.layers)[0].blobs
        from spacer_core.caffe import blob_array

        np.testing.assert_array_equal(blob_array(blobs[0]).reshape(4, 3, 5, 5), layers[0].blobs[0])
        assert blobs[0].HasField("shape") == (generation == "layer")


def test_prototxt_of_both_generations_is_what_caffe_reads():
    layers = _small_net()
    assert 'type: "Convolution"' in prototxt(layers, "layer")
    text = prototxt(layers, "layers")
    assert "type: CONVOLUTION" in text and 'input: "data"' in text
