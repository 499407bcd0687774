"""ImageNet weights conversion, checked offline against EfficientNet-PyTorch itself and pyspacer 0.14.0.

The published file is not downloaded here: a randomly initialised
EfficientNet-PyTorch b0 (fixed seed, BatchNorm statistics set from a batch
of patches) saved the way the release file was saved stands in for it.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from spacer.data_classes import DataLocation as PyspacerDataLocation
from spacer.extractors import EfficientNetExtractor as PyspacerEfficientNetExtractor
from torch import nn
from torch.nn import functional as F

from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import SpacerError, URLDownloadError
from spacer_core.extractors import EfficientNetExtractor, build_network
from spacer_core.extractors.efficientnet import FEATURE_DIM, NUM_CLASSES
from spacer_core.weights import imagenet
from spacer_core.weights.imagenet import (
    SOURCE_SHA256,
    ImagenetDownloadError,
    ImagenetWeightsError,
    convert_state_dict,
    fetch_imagenet_weights,
)

TOLERANCE = 1e-5
SEED = 1234


def _patches(n: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, 3, 224, 224) uint8-valued patches / 255, smooth to noisy, as the extractors feed them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 7, 7, generator=generator)
    smooth = F.interpolate(coarse, size=(224, 224), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, 224, 224, generator=generator)
    mix = torch.linspace(0.0, 1.0, n).view(n, 1, 1, 1)
    pixels = ((1 - mix) * smooth + mix * noise).clamp(0.0, 1.0)
    return (pixels * 255).round() / 255


@pytest.fixture(scope="module")
def third_party() -> nn.Module:
    """EfficientNet-PyTorch's b0, seeded, with BatchNorm statistics far from their defaults."""
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0")
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for bn in bns:
                bn.weight.copy_(1.0 + 0.2 * torch.randn(bn.num_features))
                bn.bias.copy_(0.1 * torch.randn(bn.num_features))
    # One pass with only BatchNorm in training mode and momentum 1 stores that
    # batch's statistics, layer by layer (drop-connect stays off); untouched
    # statistics would shrink the features towards zero, where any two
    # implementations agree.
    net.eval()
    for bn in bns:
        bn.train()
        bn.momentum = 1.0
    with torch.no_grad():
        net(_patches(8, seed=SEED))
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def _third_party_features(net: Any, x: torch.Tensor) -> torch.Tensor:
    """The 1280-d pooled output before the classifier, the layer pyspacer takes features from."""
    with torch.no_grad():
        return F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)


def _saved(obj: object, path: Path, legacy: bool = False) -> tuple[Path, str]:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_file(third_party: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The stand-in release file: a plain state dict in PyTorch's pre-1.6 (non-zip) format, as the
    2019 release file was saved."""
    folder = tmp_path_factory.mktemp("imagenet-source")
    return _saved(third_party.state_dict(), folder / "efficientnet-b0-stand-in.pth", legacy=True)


def _pyspacer_network(data: bytes) -> nn.Module:
    net = PyspacerEfficientNetExtractor.load_weights(io.BytesIO(data))
    return net.cpu().eval()


# --- conversion ----------------------------------------------------------


@pytest.mark.slow
def test_features_match_third_party_and_pyspacer(third_party: nn.Module, record_property) -> None:
    state = convert_state_dict(third_party.state_dict())
    buffer = io.BytesIO()
    torch.save({"net": state}, buffer)
    data = buffer.getvalue()

    x = _patches()
    with torch.no_grad():
        ours = build_network(data, "converted").eval()(x)
        theirs = _pyspacer_network(data).extract_features(x)
    reference = _third_party_features(third_party, x)

    assert ours.shape == theirs.shape == reference.shape == (len(x), FEATURE_DIM)
    vs_third_party = float((ours - reference).abs().max())
    vs_pyspacer = float((ours - theirs).abs().max())
    record_property("max_abs_diff_vs_efficientnet_pytorch", vs_third_party)
    record_property("max_abs_diff_vs_pyspacer", vs_pyspacer)
    assert vs_third_party <= TOLERANCE
    assert vs_pyspacer <= TOLERANCE
    # Features must tell patches apart, or agreement proves little.
    assert float((reference[0] - reference[-1]).abs().max()) > 1000 * TOLERANCE
    assert float(reference.abs().mean()) > 1e-2


def test_conversion_keeps_every_parameter_and_zeroes_the_head(third_party: nn.Module) -> None:
    source = third_party.state_dict()
    state = convert_state_dict(source)
    assert state["_fc.weight"].shape == (NUM_CLASSES, FEATURE_DIM)
    assert not state["_fc.weight"].any() and not state["_fc.bias"].any()
    for key, value in source.items():
        if key.startswith("_fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(state[key], value), key
        assert state[key].data_ptr() != value.data_ptr()  # a copy: editing one leaves the other


def test_prefix_and_old_files_without_batch_counters(third_party: nn.Module) -> None:
    # Files saved by PyTorch before 0.4.1 have no num_batches_tracked; DataParallel adds `module.`.
    source = OrderedDict(
        ("module." + k, v)
        for k, v in third_party.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    state = convert_state_dict(source)
    plain = convert_state_dict(third_party.state_dict())
    assert list(state) == list(plain)
    assert all(torch.equal(state[k], plain[k]) for k in plain if not k.endswith("num_batches_tracked"))
    assert int(state["_bn0.num_batches_tracked"]) == 0


def test_other_sizes_are_refused_by_name() -> None:
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    b1 = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b1").state_dict()
    with pytest.raises(
        ImagenetWeightsError, match="the b1 file is not an EfficientNet-b0 state dict"
    ) as info:
        convert_state_dict(b1, "the b1 file")
    assert "unexpected keys [_blocks.16." in str(info.value)


def test_renamed_layouts_and_non_state_dicts_are_refused(third_party: nn.Module) -> None:
    # timm/torchvision name the same layers differently: refused rather than guessed at.
    renamed = {k.replace("_conv_stem", "conv_stem"): v for k, v in third_party.state_dict().items()}
    with pytest.raises(ImagenetWeightsError, match=r"1 missing keys \[_conv_stem.weight\]"):
        convert_state_dict(renamed, "renamed")
    with pytest.raises(ImagenetWeightsError, match="x is not an EfficientNet-b0 state dict: found Tensor"):
        convert_state_dict(torch.zeros(3), "x")  # type: ignore[arg-type]
    with pytest.raises(ImagenetWeightsError, match="entry 'a' is not a named tensor"):
        convert_state_dict({"a": 1}, "x")
    bad_shape = dict(third_party.state_dict())
    bad_shape["_bn1.weight"] = torch.ones(7)
    with pytest.raises(ImagenetWeightsError, match=r"wrong shape \[_bn1.weight \(7,\) != \(1280,\)\]"):
        convert_state_dict(bad_shape, "x")
    nan = dict(third_party.state_dict())
    nan["_bn1.bias"] = torch.full((FEATURE_DIM,), float("nan"))
    with pytest.raises(ImagenetWeightsError, match="_bn1.bias holds NaN or infinite values"):
        convert_state_dict(nan, "x")


# --- fetch_imagenet_weights ----------------------------------------------


@pytest.mark.slow
def test_fetch_from_a_local_source_writes_a_file_pyspacer_loads(
    third_party: nn.Module, source_file: tuple[Path, str], tmp_path: Path
) -> None:
    path, sha256 = source_file
    dest = tmp_path / "out" / "imagenet_b0.pt"
    lines: list[str] = []
    result = fetch_imagenet_weights(dest, path, expected_sha256=sha256, progress=lines.append)

    data = dest.read_bytes()
    assert result.path == dest and result.sha256 == hashlib.sha256(data).hexdigest()
    assert lines[0] == f"Reading {path}" and lines[-1] == f"Wrote {dest} (sha256 {result.sha256})"
    assert sorted(torch.load(io.BytesIO(data), weights_only=True)) == ["net"]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary left behind

    x = _patches(3, seed=7)
    with torch.no_grad():
        theirs = _pyspacer_network(data).extract_features(x)
    assert float((theirs - _third_party_features(third_party, x)).abs().max()) <= TOLERANCE


def _image(height: int = 150, width: int = 200) -> Image.Image:
    """A JPEG-decoded photo-like image: smooth colour regions with texture."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(smooth + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer)


# More points than pyspacer's batch of 10, corners included.
POINTS = [
    (0, 0),
    (149, 199),
    (75, 100),
    (10, 190),
    (140, 3),
    (1, 100),
    (148, 100),
    (75, 0),
    (75, 199),
    (30, 60),
    (99, 9),
]


def _matrix(features: Any) -> np.ndarray:
    return np.array([pf.data for pf in features.point_features], dtype=np.float64)


@pytest.mark.slow
def test_zip_format_and_checkpoint_sources_convert_alike(
    third_party: nn.Module, source_file: tuple[Path, str], tmp_path: Path
) -> None:
    legacy = fetch_imagenet_weights(tmp_path / "a.pt", source_file[0], expected_sha256=source_file[1])
    expected = build_network(legacy.path).state_dict()
    for name, content in [
        ("zip.pth", third_party.state_dict()),
        ("ckpt.pth", {"state_dict": third_party.state_dict()}),
    ]:
        path, sha256 = _saved(content, tmp_path / name)
        converted = fetch_imagenet_weights(tmp_path / f"{name}.pt", path, expected_sha256=sha256)
        state = build_network(converted.path).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected), name


@pytest.mark.slow
def test_converted_file_through_both_extractors(source_file: tuple[Path, str], tmp_path: Path) -> None:
    path, sha256 = source_file
    weights = fetch_imagenet_weights(tmp_path / "imagenet_b0.pt", path, expected_sha256=sha256)
    image = _image()
    ours, _ = EfficientNetExtractor(
        data_locations={"weights": DataLocation("filesystem", str(weights.path))},
        data_hashes={"weights": weights.sha256},
    )(image, POINTS)
    theirs, _ = PyspacerEfficientNetExtractor(
        data_locations={"weights": PyspacerDataLocation("filesystem", str(weights.path))},
        data_hashes={"weights": weights.sha256},
    )(image, POINTS)
    ours_m, theirs_m = _matrix(ours), _matrix(theirs)
    assert ours_m.shape == (len(POINTS), FEATURE_DIM)
    assert float(np.abs(ours_m - theirs_m).max()) <= TOLERANCE


def test_wrong_sha256_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Any other file, even a valid state dict, is refused before it is unpickled.
    path, sha256 = _saved({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "other.pth")
    dest = tmp_path / "imagenet_b0.pt"
    with pytest.raises(ImagenetWeightsError) as info:
        fetch_imagenet_weights(dest, path)
    message = str(info.value)
    assert str(path) in message and sha256 in message and SOURCE_SHA256 in message
    assert "\n" not in message
    assert not dest.exists()


def test_unreadable_and_oversized_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle at all")
    digest = hashlib.sha256(garbage.read_bytes()).hexdigest()
    with pytest.raises(ImagenetWeightsError, match=f"Cannot read {garbage}: not a PyTorch state dict"):
        fetch_imagenet_weights(tmp_path / "out.pt", garbage, expected_sha256=digest)

    tensor, tensor_digest = _saved(torch.zeros(2), tmp_path / "tensor.pth")
    with pytest.raises(ImagenetWeightsError, match=f"{tensor} is not an EfficientNet-b0 state dict"):
        fetch_imagenet_weights(tmp_path / "out.pt", tensor, expected_sha256=tensor_digest)

    with pytest.raises(ImagenetWeightsError, match=f"Cannot read the weights source {tmp_path / 'absent'}"):
        fetch_imagenet_weights(tmp_path / "out.pt", tmp_path / "absent")

    monkeypatch.setattr(imagenet, "MAX_SOURCE_BYTES", 8)
    with pytest.raises(ImagenetWeightsError, match=r"larger than the 8-byte limit"):
        fetch_imagenet_weights(tmp_path / "out.pt", garbage, expected_sha256=digest)
    assert not (tmp_path / "out.pt").exists()


def test_offline_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, rules: Any = None, timeout: float = 20.0) -> bytes:
        assert rules.max_bytes == imagenet.MAX_SOURCE_BYTES  # the download is capped
        raise URLDownloadError(
            f"Failed to download from the URL '{url}'.", OSError("Temporary failure in name resolution")
        )

    monkeypatch.setattr(imagenet, "fetch", offline)
    with pytest.raises(ImagenetDownloadError) as info:
        fetch_imagenet_weights(tmp_path / "out.pt")
    message = str(info.value)
    assert imagenet.SOURCE_URL in message and "--source FILE" in message
    assert "Temporary failure in name resolution" in message
    assert isinstance(info.value, SpacerError)


def test_download_follows_the_url_rules(tmp_path: Path) -> None:
    # A URL on this machine is refused by the same rules as any request's URL.
    with pytest.raises(ImagenetDownloadError, match="Could not download the ImageNet weights"):
        fetch_imagenet_weights(tmp_path / "out.pt", url="http://127.0.0.1:9/efficientnet-b0.pth")


def test_command_line_prints_the_sha256(
    source_file: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path, sha256 = source_file
    monkeypatch.setattr(imagenet, "SOURCE_SHA256", sha256)
    dest = tmp_path / "w.pt"
    assert imagenet.main(["--out", str(dest), "--source", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert "sha256 verified" in out.err

    monkeypatch.undo()
    assert imagenet.main(["--out", str(tmp_path / "x.pt"), "--source", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("Reading ") and "Traceback" not in err
    assert err.splitlines()[1].startswith(f"error: {path} has sha256 {sha256}") and err.count("\n") == 2
