"""Feature extractors, with pyspacer 0.14.0 as the oracle for features, errors and JSON."""

from __future__ import annotations

import io
import json
import os
import random
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spacer.data_classes import DataLocation as PyspacerDataLocation
from spacer.exceptions import HashMismatchError as PyspacerHashMismatchError
from spacer.extractors import EfficientNetExtractor as PyspacerEfficientNetExtractor
from spacer.extractors import FeatureExtractor as PyspacerFeatureExtractor

from spacer_core import config
from spacer_core.data_classes import DataLocation, InvalidDataError
from spacer_core.exceptions import ConfigError, HashMismatchError
from spacer_core.extractors import (
    DummyExtractor,
    EfficientNetExtractor,
    FeatureExtractor,
    VGG16CaffeExtractor,
    WeightsFileError,
    build_network,
    register_extractor_class,
)
from spacer_core.extractors.class_paths import KNOWN_CLASS_PATHS
from spacer_core.inference import BatcherSettings
from spacer_core.runtime import Runtime, RuntimeSettings
from spacer_core.storage import clear_memory_storage, storage_factory
from spacer_core.testing import WeightsFile, make_state_dict, make_weights

TOLERANCE = 1e-4
HASH_ERROR = "Hash doesn't match for extractor's 'weights' file/blob."


@pytest.fixture(autouse=True)
def _fresh_memory_storage():
    clear_memory_storage()
    yield
    clear_memory_storage()


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "extractor-cache"
    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", str(folder))
    return folder


def _image(height: int = 150, width: int = 200, seed: int = 0) -> Image.Image:
    """A JPEG-decoded image with smooth regions and texture, so patches differ."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    noisy = np.clip(smooth + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer)


POINTS = [(0, 0), (149, 199), (75, 100), (10, 190), (140, 3), (75, 100)]


def _extractor(weights: WeightsFile, sha256: str | None = None) -> EfficientNetExtractor:
    return EfficientNetExtractor(
        data_locations={"weights": DataLocation("filesystem", str(weights.path))},
        data_hashes={"weights": sha256 or weights.sha256},
    )


def _matrix(features) -> np.ndarray:
    return np.array([pf.data for pf in features.point_features], dtype=np.float64)


# --- features ------------------------------------------------------------


# More points than pyspacer's batch of 10, so the two batch differently.
PARITY_POINTS = POINTS + [(1, 100), (148, 100), (75, 0), (75, 199), (30, 60)]


@pytest.mark.slow
def test_features_match_pyspacer(efficientnet_weights: WeightsFile, record_property) -> None:
    image = _image()
    ours, msg = _extractor(efficientnet_weights)(image, PARITY_POINTS)
    reference = PyspacerEfficientNetExtractor(
        data_locations={"weights": PyspacerDataLocation("filesystem", str(efficientnet_weights.path))},
        data_hashes={"weights": efficientnet_weights.sha256},
    )
    theirs, their_msg = reference(image, PARITY_POINTS)

    ours_m, theirs_m = _matrix(ours), _matrix(theirs)
    assert ours_m.shape == theirs_m.shape == (len(PARITY_POINTS), 1280)
    max_diff = float(np.abs(ours_m - theirs_m).max())
    record_property("max_abs_feature_diff", max_diff)
    print(f"max abs feature difference vs pyspacer: {max_diff:.3g}")
    assert max_diff <= TOLERANCE
    # The weights must make patches distinguishable, or the comparison proves little.
    distinct = np.abs(ours_m[0] - ours_m[2]).max()
    assert distinct > 100 * TOLERANCE
    assert np.abs(ours_m[2] - ours_m[5]).max() <= 1e-5  # same point twice

    assert [(pf.row, pf.col) for pf in ours.point_features] == PARITY_POINTS
    assert ours.valid_rowcol and ours.feature_dim == 1280 and ours.npoints == len(PARITY_POINTS)
    assert msg.extractor_loaded_remotely is False is their_msg.extractor_loaded_remotely
    assert msg.runtime > 0


def test_batch_size_does_not_change_features(efficientnet_weights: WeightsFile) -> None:
    image = _image(seed=1)
    extractor = _extractor(efficientnet_weights)
    with Runtime(RuntimeSettings(batcher=BatcherSettings(max_batch_size=16))).activate():
        large, _ = extractor(image, POINTS)
    with Runtime(RuntimeSettings(batcher=BatcherSettings(max_batch_size=4))).activate():
        small, _ = extractor(image, POINTS)
    assert np.abs(_matrix(large) - _matrix(small)).max() <= 1e-5


def test_call_rgb_matches_call(efficientnet_weights: WeightsFile) -> None:
    from spacer_core.crop import decode_image

    buffer = io.BytesIO()
    _image(seed=6).save(buffer, "PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    extractor = _extractor(efficientnet_weights)
    from_pillow, _ = extractor(image, POINTS[:3])
    from_rgb, msg = extractor.call_rgb(decode_image(buffer.getvalue()).rgb, POINTS[:3])
    np.testing.assert_array_equal(_matrix(from_pillow), _matrix(from_rgb))
    assert [(pf.row, pf.col) for pf in from_rgb.point_features] == POINTS[:3]
    assert msg.extractor_loaded_remotely is False


def test_module_prefix_is_optional(efficientnet_weights: WeightsFile, tmp_path: Path) -> None:
    plain_path = tmp_path / "plain.pt"
    plain_sha = make_weights(plain_path, prefix="")
    assert plain_sha != efficientnet_weights.sha256
    with_prefix = build_network(efficientnet_weights.path)
    without = build_network(plain_path)
    for (k1, v1), (k2, v2) in zip(with_prefix.state_dict().items(), without.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    image = _image(seed=2)
    a, _ = _extractor(efficientnet_weights)(image, POINTS[:2])
    b, _ = _extractor(WeightsFile(plain_path, plain_sha))(image, POINTS[:2])
    np.testing.assert_array_equal(_matrix(a), _matrix(b))


def test_network_is_loaded_once_per_weights(efficientnet_weights: WeightsFile, monkeypatch) -> None:
    import spacer_core.runtime as runtime_module

    built: list[str] = []
    original = runtime_module.load_backend

    def counting_load(sha256, make_net, **kwargs):
        built.append(sha256)
        return original(sha256, make_net, **kwargs)

    monkeypatch.setattr(runtime_module, "load_backend", counting_load)
    runtime = Runtime()
    image = _image(seed=3)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with runtime.activate():
                _extractor(efficientnet_weights)(image, POINTS[:1])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with runtime.activate():
        _extractor(efficientnet_weights)(image, POINTS[:1])
    assert built == [efficientnet_weights.sha256]


def test_runtime_features_is_the_single_entry(efficientnet_weights: WeightsFile, monkeypatch) -> None:
    """Every batch of an extractor call passes through the runtime's features(), batch_size at a time."""
    extractor = _extractor(efficientnet_weights)
    calls: list[tuple[int, ...]] = []

    def fake_features(self, net, batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        assert net.key == efficientnet_weights.sha256 and net.feature_dim == 1280
        assert batch.dtype == np.float32 and 0.0 <= batch.min() and batch.max() <= 1.0
        return batch.mean(axis=(2, 3)).repeat(1280 // 3 + 1, axis=1)[:, :1280]

    runtime = Runtime(RuntimeSettings(batcher=BatcherSettings(max_batch_size=4)))
    monkeypatch.setattr(Runtime, "features", fake_features)
    with runtime.activate():
        features, _ = extractor(_image(seed=4), POINTS)
    assert calls == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert _matrix(features).shape == (len(POINTS), 1280)


@pytest.mark.gpu
def test_cuda_network_matches_cpu(efficientnet_weights: WeightsFile) -> None:
    from spacer_core.inference import EagerBackend, Precision

    batch = np.random.default_rng(0).random((4, 3, 224, 224), dtype=np.float32)
    net = build_network(efficientnet_weights.path)
    cpu = EagerBackend(net, torch.device("cpu"), Precision.EXACT).run(batch)
    # EXACT mode turns TF32 off on CUDA: float32 is what the tolerance is defined against.
    cuda = EagerBackend(net, torch.device("cuda"), Precision.EXACT).run(batch)
    assert np.abs(cpu - cuda).max() <= TOLERANCE


@pytest.mark.slow
def test_built_network_can_be_compiled(efficientnet_weights: WeightsFile) -> None:
    net = build_network(efficientnet_weights.path.read_bytes(), "weights bytes")
    batch = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still used
        scripted = torch.jit.script(net)
    with torch.inference_mode():
        expected = net(batch)
        assert expected.shape == (2, 1280)
        assert torch.allclose(scripted(batch), expected, atol=1e-5)
        assert net.logits(batch).shape == (2, 1275)


# --- weights files -------------------------------------------------------


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_garbage_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsFileError, match="garbage.pt"):
        build_network(path)


def test_weights_without_net_key(tmp_path: Path) -> None:
    path = _save({"state_dict": make_state_dict()}, tmp_path / "nonet.pt")
    with pytest.raises(WeightsFileError, match=r"nonet.pt.*'net'.*state_dict"):
        build_network(path)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = make_state_dict()
    del state["_blocks.3._bn1.running_var"]
    state["_extra.weight"] = torch.zeros(1)
    path = _save({"net": state}, tmp_path / "keys.pt")
    with pytest.raises(WeightsFileError) as info:
        build_network(path)
    text = str(info.value)
    assert "keys.pt" in text and "_blocks.3._bn1.running_var" in text and "_extra.weight" in text


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    state = make_state_dict()
    state["_fc.weight"] = torch.zeros(1000, 1280)
    state["_fc.bias"] = torch.zeros(1000)
    path = _save({"net": state}, tmp_path / "shape.pt")
    with pytest.raises(WeightsFileError, match=r"shape.pt.*_fc.weight \(1000, 1280\) != \(1275, 1280\)"):
        build_network(path)


class _NotATensor:
    pass


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    path = _save({"net": make_state_dict(), "payload": _NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(WeightsFileError, match="weights_only"):
        build_network(path)


def test_numpy1_era_scalars_load(tmp_path: Path) -> None:
    """Files saved under NumPy 1 name `numpy.core.multiarray.scalar`; they must load."""
    buffer = io.BytesIO()
    content = {"net": make_state_dict(), "best_acc": np.float64(0.75)}
    torch.save(content, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "numpy1.pt"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    build_network(path)


def test_bad_weights_through_the_extractor(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00" * 100)
    extractor = EfficientNetExtractor(data_locations={"weights": DataLocation("filesystem", str(path))})
    with pytest.raises(WeightsFileError, match="broken.pt"):
        extractor(_image(seed=5), POINTS[:1])


# --- hashes and remote caching --------------------------------------------


def test_hash_mismatch_matches_pyspacer(efficientnet_weights: WeightsFile) -> None:
    wrong = "0" * 64
    with pytest.raises(HashMismatchError) as ours:
        _extractor(efficientnet_weights, wrong)(_image(), POINTS[:1])
    reference = PyspacerEfficientNetExtractor(
        data_locations={"weights": PyspacerDataLocation("filesystem", str(efficientnet_weights.path))},
        data_hashes={"weights": wrong},
    )
    with pytest.raises(PyspacerHashMismatchError) as theirs:
        reference(_image(), POINTS[:1])
    assert str(ours.value) == str(theirs.value) == HASH_ERROR


def test_changed_local_file_is_checked_again(efficientnet_weights: WeightsFile, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(efficientnet_weights.path.read_bytes())
    extractor = _extractor(WeightsFile(path, efficientnet_weights.sha256))
    extractor(_image(), POINTS[:1])
    path.write_bytes(b"replaced by something else")
    with pytest.raises(HashMismatchError, match="'weights'"):
        extractor(_image(), POINTS[:1])


def test_memory_storage_weights(efficientnet_weights: WeightsFile) -> None:
    storage_factory("memory").store("weights/b0.pt", efficientnet_weights.path.read_bytes())
    loc = DataLocation("memory", "weights/b0.pt")
    good = EfficientNetExtractor({"weights": loc}, {"weights": efficientnet_weights.sha256})
    features, msg = good(_image(), POINTS[:2])
    assert msg.extractor_loaded_remotely is False and features.npoints == 2
    bad = EfficientNetExtractor({"weights": loc}, {"weights": "f" * 64})
    with pytest.raises(HashMismatchError, match="'weights'"):
        bad(_image(), POINTS[:2])


def test_url_weights_are_cached_by_content(
    efficientnet_weights: WeightsFile, http_server, cache_dir: Path
) -> None:
    url = http_server.add("/models/b0.pt", efficientnet_weights.path.read_bytes())
    extractor = EfficientNetExtractor(
        {"weights": DataLocation("url", url)}, {"weights": efficientnet_weights.sha256}
    )

    first, msg = extractor(_image(), POINTS[:2])
    assert msg.extractor_loaded_remotely is True
    cached = cache_dir / "sha256" / efficientnet_weights.sha256
    assert cached.read_bytes() == efficientnet_weights.path.read_bytes()
    assert not (cache_dir / "b0.pt").exists()
    assert http_server.hits["/models/b0.pt"] == 1

    second, msg = extractor(_image(), POINTS[:2])
    assert msg.extractor_loaded_remotely is False
    assert http_server.hits["/models/b0.pt"] == 1
    np.testing.assert_array_equal(_matrix(first), _matrix(second))

    # A damaged cached copy is not trusted: it is fetched again.
    cached.write_bytes(b"damaged")
    _, msg = extractor(_image(), POINTS[:2])
    assert msg.extractor_loaded_remotely is True and http_server.hits["/models/b0.pt"] == 2
    assert cached.read_bytes() == efficientnet_weights.path.read_bytes()


def test_same_filename_from_another_url_is_not_confused(
    efficientnet_weights: WeightsFile, http_server, cache_dir: Path
) -> None:
    # Two URLs ending in the same name used to share one cache file.
    good = http_server.add("/a/b0.pt", efficientnet_weights.path.read_bytes())
    evil = http_server.add("/b/b0.pt", b"other weights")
    EfficientNetExtractor({"weights": DataLocation("url", good)}, {"weights": efficientnet_weights.sha256})(
        _image(), POINTS[:1]
    )
    unhashed = EfficientNetExtractor({"weights": DataLocation("url", evil)})
    # Not a weights file: it was downloaded and read, not taken from the other URL's copy.
    with pytest.raises(WeightsFileError):
        unhashed(_image(), POINTS[:1])
    assert http_server.hits["/b/b0.pt"] == 1
    assert (
        cache_dir / "sha256" / efficientnet_weights.sha256
    ).read_bytes() == efficientnet_weights.path.read_bytes()


def test_unhashed_url_weights_are_downloaded_once_per_process(
    efficientnet_weights: WeightsFile, http_server, cache_dir: Path
) -> None:
    url = http_server.add("/nohash/b0.pt", efficientnet_weights.path.read_bytes())
    extractor = EfficientNetExtractor({"weights": DataLocation("url", url)})
    _, first = extractor(_image(), POINTS[:1])
    _, second = extractor(_image(), POINTS[:1])
    assert (first.extractor_loaded_remotely, second.extractor_loaded_remotely) == (True, False)
    assert http_server.hits["/nohash/b0.pt"] == 1
    # A copy planted under the digest is refused even without a hash in the message.
    (cache_dir / "sha256" / efficientnet_weights.sha256).write_bytes(b"planted")
    _, third = extractor(_image(), POINTS[:1])
    assert third.extractor_loaded_remotely is True and http_server.hits["/nohash/b0.pt"] == 2


def test_url_hash_mismatch_leaves_no_cached_file(
    efficientnet_weights: WeightsFile, http_server, cache_dir: Path
) -> None:
    url = http_server.add("/models/b0.pt", efficientnet_weights.path.read_bytes())
    extractor = EfficientNetExtractor({"weights": DataLocation("url", url)}, {"weights": "a" * 64})
    for attempt in (1, 2):
        with pytest.raises(HashMismatchError) as info:
            extractor(_image(), POINTS[:1])
        assert str(info.value) == HASH_ERROR
        assert not list((cache_dir / "sha256").iterdir())
        assert http_server.hits["/models/b0.pt"] == attempt


def test_stale_cached_file_is_removed_on_mismatch(
    efficientnet_weights: WeightsFile, http_server, cache_dir: Path
) -> None:
    stale = cache_dir / "sha256" / efficientnet_weights.sha256
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    url = http_server.add("/models/b0.pt", b"also wrong")
    extractor = EfficientNetExtractor(
        {"weights": DataLocation("url", url)}, {"weights": efficientnet_weights.sha256}
    )
    with pytest.raises(HashMismatchError):
        extractor(_image(), POINTS[:1])
    assert not stale.exists()


def test_a_hash_that_is_not_a_digest_names_no_cache_file(
    http_server, cache_dir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    url = http_server.add("/x.pt", b"whatever")
    extractor = EfficientNetExtractor({"weights": DataLocation("url", url)}, {"weights": "../../victim"})
    with pytest.raises(HashMismatchError):
        extractor(_image(), POINTS[:1])
    assert victim.read_bytes() == b"keep me"


def test_remote_weights_need_a_cache_dir(http_server, monkeypatch) -> None:
    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", None)
    extractor = EfficientNetExtractor({"weights": DataLocation("url", http_server.url("/b0.pt"))})
    with pytest.raises(ConfigError, match="EXTRACTORS_CACHE_DIR"):
        extractor(_image(), POINTS[:1])


@pytest.mark.slow
def test_s3_weights_are_cached(efficientnet_weights: WeightsFile, s3_bucket: str, cache_dir: Path) -> None:
    storage_factory("s3", s3_bucket).store("extractors/b0_s3.pt", efficientnet_weights.path.read_bytes())
    loc = DataLocation("s3", "extractors/b0_s3.pt", bucket_name=s3_bucket)
    extractor = EfficientNetExtractor({"weights": loc}, {"weights": efficientnet_weights.sha256})
    _, first = extractor(_image(), POINTS[:1])
    _, second = extractor(_image(), POINTS[:1])
    assert (first.extractor_loaded_remotely, second.extractor_loaded_remotely) == (True, False)
    assert (cache_dir / "sha256" / efficientnet_weights.sha256).exists()


def test_pyspacer_style_data_access(efficientnet_weights: WeightsFile) -> None:
    extractor = _extractor(efficientnet_weights)
    stream, remote = extractor.load_datastream("weights")
    assert stream.read() == efficientnet_weights.path.read_bytes() and remote is False
    assert extractor.load_data_into_filesystem("weights") == (str(efficientnet_weights.path), False)


# --- JSON form -------------------------------------------------------------

ALIASES = {
    "spacer.extract_features.EfficientNetExtractor": EfficientNetExtractor,
    "spacer.extractors.EfficientNetExtractor": EfficientNetExtractor,
    "spacer.extractors.efficientnet.EfficientNetExtractor": EfficientNetExtractor,
    "spacer_core.extractors.EfficientNetExtractor": EfficientNetExtractor,
    "spacer_core.extractors.efficientnet.EfficientNetExtractor": EfficientNetExtractor,
    "spacer.extract_features.VGG16CaffeExtractor": VGG16CaffeExtractor,
    "spacer.extractors.VGG16CaffeExtractor": VGG16CaffeExtractor,
    "spacer.extractors.vgg16.VGG16CaffeExtractor": VGG16CaffeExtractor,
    "spacer_core.extractors.VGG16CaffeExtractor": VGG16CaffeExtractor,
    "spacer_core.extractors.vgg16.VGG16CaffeExtractor": VGG16CaffeExtractor,
    "spacer.extract_features.DummyExtractor": DummyExtractor,
    "spacer.extractors.DummyExtractor": DummyExtractor,
    "spacer.extractors.base.DummyExtractor": DummyExtractor,
    "spacer_core.extractors.DummyExtractor": DummyExtractor,
    "spacer_core.extractors.base.DummyExtractor": DummyExtractor,
    "spacer_core.extractors.dummy.DummyExtractor": DummyExtractor,
}

LOCATIONS = {
    EfficientNetExtractor: {"weights": {"storage_type": "s3", "key": "w/b0.pt", "bucket_name": "models"}},
    VGG16CaffeExtractor: {
        "definition": {"storage_type": "filesystem", "key": "/m/vgg16.prototxt", "bucket_name": None},
        "weights": {
            "storage_type": "url",
            "key": "https://example.org/vgg16.caffemodel",
            "bucket_name": None,
        },
    },
    DummyExtractor: {},
}


def test_aliases_cover_every_known_path() -> None:
    assert set(ALIASES) == set(KNOWN_CLASS_PATHS)


@pytest.mark.parametrize("class_path", sorted(ALIASES))
def test_class_path_aliases(class_path: str) -> None:
    expected = ALIASES[class_path]
    data = {
        "class_path": class_path,
        "data_locations": LOCATIONS[expected],
        "data_hashes": {"weights": "ab" * 32},
    }
    extractor = FeatureExtractor.deserialize(json.loads(json.dumps(data)))
    assert type(extractor) is expected
    assert all(isinstance(loc, DataLocation) for loc in extractor.data_locations.values())
    assert {k: v.serialize() for k, v in extractor.data_locations.items()} == LOCATIONS[expected]
    assert extractor.data_hashes == {"weights": "ab" * 32}


@pytest.mark.parametrize(
    "extractor",
    [
        EfficientNetExtractor({"weights": DataLocation("filesystem", "/w/b0.pt")}, {"weights": "cd" * 32}),
        VGG16CaffeExtractor(
            {
                "definition": DataLocation("filesystem", "/m/v.prototxt"),
                "weights": DataLocation("s3", "v", "b"),
            }
        ),
        DummyExtractor(feature_dim=17),
    ],
    ids=lambda e: type(e).__name__,
)
def test_json_is_read_by_pyspacer_and_back(extractor: FeatureExtractor) -> None:
    data = json.loads(json.dumps(extractor.serialize()))
    theirs = PyspacerFeatureExtractor.deserialize(data)
    assert type(theirs).__name__ == type(extractor).__name__
    # pyspacer writes exactly what we write, so our JSON is its JSON.
    assert theirs.serialize() == data
    assert FeatureExtractor.deserialize(theirs.serialize()) == extractor


def test_unknown_class_path() -> None:
    with pytest.raises(InvalidDataError, match="spacer.extractors.ResNetExtractor"):
        FeatureExtractor.deserialize(
            {"class_path": "spacer.extractors.ResNetExtractor", "data_locations": {}}
        )


def test_class_path_cannot_import_other_modules() -> None:
    # A message must not be able to name arbitrary importable code.
    with pytest.raises(InvalidDataError, match="os.path.join"):
        FeatureExtractor.deserialize({"class_path": "os.path.join", "data_locations": {}})
    with pytest.raises(InvalidDataError, match="spacer_core.data_classes.DataLocation"):
        FeatureExtractor.deserialize(
            {"class_path": "spacer_core.data_classes.DataLocation", "data_locations": {}}
        )


def test_registered_class_path() -> None:
    class SmallDummy(DummyExtractor):
        pass

    register_extractor_class("my_lab.extractors.SmallDummy", SmallDummy)
    extractor = FeatureExtractor.deserialize(
        {"class_path": "my_lab.extractors.SmallDummy", "data_locations": {}, "feature_dim": 3}
    )
    assert type(extractor) is SmallDummy and extractor.feature_dim == 3
    with pytest.raises(TypeError):
        register_extractor_class("x.Y", dict)


def test_missing_data_location() -> None:
    with pytest.raises(
        ValueError, match="weights must be present in data_locations for EfficientNetExtractor"
    ):
        EfficientNetExtractor(data_locations={})
    with pytest.raises(ValueError, match="definition must be present"):
        VGG16CaffeExtractor(data_locations={"weights": DataLocation("filesystem", "/x")})


# --- Dummy and VGG16 -------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 5, 1280, 4096])
def test_dummy_dims(dim: int) -> None:
    features, msg = DummyExtractor(feature_dim=dim)(_image(), POINTS)
    matrix = _matrix(features)
    assert matrix.shape == (len(POINTS), dim) and features.feature_dim == dim
    assert ((0.0 <= matrix) & (matrix < 1.0)).all()
    assert [(pf.row, pf.col) for pf in features.point_features] == POINTS
    assert msg.extractor_loaded_remotely is False


def test_dummy_defaults_and_seed() -> None:
    assert DummyExtractor().feature_dim == 4096
    random.seed(11)
    a, _ = DummyExtractor(feature_dim=8)(_image(), POINTS)
    random.seed(11)
    b, _ = DummyExtractor(feature_dim=8)(_image(), POINTS)
    np.testing.assert_array_equal(_matrix(a), _matrix(b))
    assert DummyExtractor(feature_dim=8).serialize()["feature_dim"] == 8
    with pytest.raises(ValueError, match="feature_dim"):
        DummyExtractor(feature_dim=0)


def test_extractor_equality_and_repr(efficientnet_weights: WeightsFile) -> None:
    a, b = _extractor(efficientnet_weights), _extractor(efficientnet_weights)
    assert a == b and a != _extractor(efficientnet_weights, "0" * 64)
    assert "EfficientNetExtractor" in repr(a)


def test_no_points_is_an_error(efficientnet_weights: WeightsFile) -> None:
    with pytest.raises(ValueError, match="at least one"):
        _extractor(efficientnet_weights)(_image(), [])


@pytest.mark.slow
def test_weights_helper_is_deterministic(tmp_path: Path, efficientnet_weights: WeightsFile) -> None:
    from spacer_core.weights import synthetic as helper

    # A fresh build (not the per-process copy) must reproduce the fixture's file.
    rebuilt = helper._calibrated_state.__wrapped__(0)
    stored = torch.load(efficientnet_weights.path, weights_only=True)["net"]
    assert list(stored) == ["module." + k for k in rebuilt]
    assert all(torch.equal(stored["module." + k], v) for k, v in rebuilt.items())
    assert make_weights(tmp_path / "a.pt") == efficientnet_weights.sha256
    assert os.path.getsize(tmp_path / "a.pt") > 10_000_000
    other = make_state_dict(seed=1)
    assert not torch.equal(other["_bn1.running_var"], rebuilt["_bn1.running_var"])


def test_state_dict_keys_match_pyspacer_model() -> None:
    theirs = PyspacerEfficientNetExtractor.untrained_model().state_dict()
    ours = make_state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert isinstance(ours, OrderedDict)
