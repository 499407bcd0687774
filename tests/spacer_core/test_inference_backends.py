"""Compiled backends against pyspacer's own EfficientNet on the same weights file."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from spacer.extractors.efficientnet import EfficientNetExtractor as PyspacerEfficientNet
from torch import nn
from torchvision import transforms

from spacer_core.crop import crop_array
from spacer_core.extractors.efficientnet import build_network
from spacer_core.inference import (
    EagerBackend,
    OnnxBackend,
    Precision,
    TorchScriptBackend,
    compile_cache,
    load_backend,
    to_network_input,
)
from spacer_core.inference import backends as backends_module
from spacer_core.inference.batcher import run_in_batches

PARITY = 1e-4


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    """6 uint8 crops from a blocky-plus-noise test image, cut as pyspacer cuts them."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=(40, 50, 3)).repeat(8, axis=0).repeat(8, axis=1)
    image = np.clip(base + rng.integers(-20, 21, size=base.shape), 0, 255).astype(np.uint8)
    rowcols = [(int(r), int(c)) for r, c in zip(rng.integers(0, 320, 6), rng.integers(0, 400, 6))]
    return crop_array(image, rowcols)


@pytest.fixture(scope="module")
def pyspacer_features(efficientnet_weights, patches) -> np.ndarray:  # noqa: F811
    """Features as pyspacer computes them: its network, ToTensor, batches of 10."""
    with open(efficientnet_weights.path, "rb") as f:
        net = PyspacerEfficientNet.load_weights(f).eval()
    to_tensor = transforms.ToTensor()
    out = []
    with torch.no_grad():
        for start in range(0, len(patches), 10):
            batch = torch.stack([to_tensor(p) for p in patches[start : start + 10]])
            out.append(net.extract_features(batch).numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory):
    """One compile cache for the parity tests, so each backend is built once."""
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture
def make_net(efficientnet_weights):  # noqa: F811
    calls = []

    def make() -> nn.Module:
        calls.append(1)
        return build_network(efficientnet_weights.path)

    make.calls = calls  # type: ignore[attr-defined]
    return make


def test_uint8_conversion_is_bitwise_totensor(patches):
    to_tensor = transforms.ToTensor()
    expected = torch.stack([to_tensor(p) for p in patches]).numpy()
    assert np.array_equal(to_network_input(patches), expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["onnxruntime", "torchscript", "eager"])
@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_exact_backends_match_pyspacer(
    kind,
    batch_size,
    efficientnet_weights,
    make_net,
    patches,
    pyspacer_features,
    shared_cache,  # noqa: F811
):
    backend = load_backend(
        efficientnet_weights.sha256, make_net, device="cpu", kind=kind, cache_dir=shared_cache
    )
    assert backend.name == kind
    features = run_in_batches(backend, patches, batch_size)
    assert features.shape == (len(patches), 1280) and features.dtype == np.float32
    assert np.max(np.abs(features - pyspacer_features)) <= PARITY
    # Features vary between patches, so parity is not trivially met.
    assert np.std(pyspacer_features[:, :64], axis=0).mean() > 1e-2


@pytest.mark.slow
def test_auto_on_cpu_is_onnxruntime_and_compiled_once(efficientnet_weights, make_net, tmp_path):  # noqa: F811
    first = load_backend(efficientnet_weights.sha256, make_net, device="cpu", cache_dir=tmp_path)
    assert isinstance(first, OnnxBackend)
    built = len(make_net.calls)
    artifacts = [p for p in tmp_path.glob(f"{efficientnet_weights.sha256}.onnx-*") if p.suffix != ".sha256"]
    assert len(artifacts) == 1 and built == 1
    assert compile_cache.read_verified(artifacts[0]) is not None  # stored with its digest
    # A second load comes from the disk cache without building the torch network.
    second = load_backend(efficientnet_weights.sha256, make_net, device="cpu", cache_dir=tmp_path)
    assert len(make_net.calls) == built
    batch = to_network_input(np.full((2, 224, 224, 3), 90, np.uint8))
    assert np.array_equal(first.run(batch), second.run(batch))
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_dir_follows_extractors_cache_dir(monkeypatch, tmp_path):
    from spacer_core import config

    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", str(tmp_path / "extractors"))
    assert compile_cache.cache_dir() == tmp_path / "extractors" / "compiled"
    monkeypatch.setattr(config, "EXTRACTORS_CACHE_DIR", None)
    assert compile_cache.cache_dir().is_dir()


@pytest.mark.slow
def test_corrupt_artifact_is_rebuilt(efficientnet_weights, make_net, tmp_path):  # noqa: F811
    artifact = compile_cache.artifact_path(
        tmp_path, efficientnet_weights.sha256, "onnx", "exact-cpu", ".onnx"
    )
    artifact.write_bytes(b"not an onnx model")
    backend = load_backend(efficientnet_weights.sha256, make_net, device="cpu", cache_dir=tmp_path)
    assert isinstance(backend, OnnxBackend)
    assert artifact.stat().st_size > 1_000_000


class _NumpyRoundTrip(nn.Module):
    """Leaves torch for numpy mid-network: tracing bakes the probe input in as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(np.ascontiguousarray(x.detach().cpu().numpy()) * 2)
        return self.proj(y).mean(dim=(2, 3))


@pytest.mark.parametrize("kind", ["onnxruntime", "torchscript"])
def test_backend_that_fails_verification_falls_back_to_eager(kind, tmp_path):
    sha = "ab" * 32
    backend = load_backend(sha, lambda: _NumpyRoundTrip().eval(), device="cpu", kind=kind, cache_dir=tmp_path)
    assert isinstance(backend, EagerBackend)
    # The rejected artifact is not left behind for the next load.
    assert not list(tmp_path.glob(f"{sha}.*"))


def test_network_that_cannot_be_built_raises_its_own_error(tmp_path):
    calls = []

    def broken() -> nn.Module:
        calls.append(1)
        raise OSError("weights unreadable")

    with pytest.raises(OSError, match="weights unreadable"):
        load_backend("cd" * 32, broken, device="cpu", cache_dir=tmp_path)
    assert calls == [1]  # not retried for the eager fallback


def test_network_that_cannot_run_falls_back_to_eager_and_fails_per_batch(tmp_path):
    class Unrunnable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("cannot run")

    backend = load_backend("ce" * 32, lambda: Unrunnable(), device="cpu", cache_dir=tmp_path)
    assert isinstance(backend, EagerBackend)
    with pytest.raises(RuntimeError, match="cannot run"):
        backend.run(to_network_input(np.zeros((1, 224, 224, 3), np.uint8)))


def test_bad_inputs_are_named(tmp_path, make_net, efficientnet_weights):  # noqa: F811
    backend = load_backend(efficientnet_weights.sha256, make_net, device="cpu", kind="eager")
    with pytest.raises(ValueError, match=r"\(N>0, 3, 224, 224\)"):
        backend.run(np.zeros((1, 3, 100, 100), np.float32))
    with pytest.raises(TypeError, match="float32"):
        backend.run(np.zeros((1, 3, 224, 224), np.float64))
    with pytest.raises(ValueError, match="Unknown precision"):
        load_backend(efficientnet_weights.sha256, make_net, precision="half")
    with pytest.raises(ValueError, match="Unknown backend kind"):
        load_backend(efficientnet_weights.sha256, make_net, kind="tensorrt")
    with pytest.raises(ValueError, match="sha256"):
        compile_cache.artifact_path(tmp_path, "not-a-digest", "onnx", "x", ".onnx")


@pytest.mark.slow
def test_fast_precision_on_cpu(efficientnet_weights, make_net, patches, pyspacer_features, tmp_path):  # noqa: F811
    from spacer_core.inference.precision import cpu_has_bf16, openvino_available

    backend = load_backend(
        efficientnet_weights.sha256, make_net, device="cpu", precision=Precision.FAST, cache_dir=tmp_path
    )
    features = run_in_batches(backend, patches, 4)
    assert np.isfinite(features).all()
    if cpu_has_bf16() and openvino_available():
        assert backend.name == "openvino" and backend.precision is Precision.FAST
        # bf16 drifts (8 bits of mantissa) but stays close in aggregate.
        rel = np.abs(features - pyspacer_features).mean() / np.abs(pyspacer_features).mean()
        assert rel < 0.05
    else:  # no bf16 or no OpenVINO: exact, and it says so
        assert backend.name == "onnxruntime" and backend.precision is Precision.EXACT
        assert np.max(np.abs(features - pyspacer_features)) <= PARITY


def test_fast_cpu_status_names_what_runs(monkeypatch, tmp_path):
    from spacer_core.inference import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ["avx512_bf16"]
    cpuinfo.write_text("flags : fpu sse2 avx2\n")
    assert precision.cpu_bf16_flags(str(cpuinfo)) == []
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert "no native bf16" in precision.fast_cpu_status() and "exact" in precision.fast_cpu_status()
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16"])
    monkeypatch.setattr(precision, "openvino_available", lambda: False)
    assert "OpenVINO is not installed" in precision.fast_cpu_status()
    monkeypatch.setattr(precision, "openvino_available", lambda: True)
    assert "OpenVINO bf16" in precision.fast_cpu_status()


def test_eager_fast_uses_bf16_when_the_cpu_has_it(make_net):
    backend = EagerBackend(make_net(), torch.device("cpu"), Precision.FAST)
    expected = torch.bfloat16 if backends_module.half_dtype(torch.device("cpu")) else torch.float32
    assert backend.dtype == expected


# -- GPU (skipped without CUDA) -----------------------------------------------------------


@pytest.mark.gpu
def test_torchscript_cuda_exact_matches_pyspacer(
    efficientnet_weights,
    make_net,
    patches,
    pyspacer_features,
    tmp_path,  # noqa: F811
):
    backend = load_backend(efficientnet_weights.sha256, make_net, device="cuda", cache_dir=tmp_path)
    assert isinstance(backend, TorchScriptBackend)
    for batch_size in (1, 4, 6):
        features = run_in_batches(backend, patches, batch_size)
        assert np.max(np.abs(features - pyspacer_features)) <= PARITY


@pytest.mark.gpu
def test_torchscript_cuda_fast_is_close(efficientnet_weights, make_net, patches, pyspacer_features, tmp_path):  # noqa: F811
    backend = load_backend(
        efficientnet_weights.sha256, make_net, device="cuda", precision="fast", cache_dir=tmp_path
    )
    features = run_in_batches(backend, patches, 4)
    rel = np.abs(features - pyspacer_features).mean() / np.abs(pyspacer_features).mean()
    assert rel < 0.02


@pytest.mark.gpu
def test_cuda_launches_overlap_and_results_stay_separate(efficientnet_weights, make_net, patches, tmp_path):  # noqa: F811
    backend = load_backend(efficientnet_weights.sha256, make_net, device="cuda", cache_dir=tmp_path)
    batches = [to_network_input(patches[i : i + 2]) for i in range(0, 6, 2)]
    pending = [backend.launch(b) for b in batches]
    # Overwriting the inputs after launch must not change the results.
    for b in batches:
        b[...] = 0
    together = np.concatenate([p.result() for p in pending])
    alone = run_in_batches(backend, patches, 2)
    assert np.max(np.abs(together - alone)) <= 1e-6


@pytest.mark.slow
def test_fold_batchnorm_keeps_features_and_removes_every_batchnorm(make_net, patches):
    from spacer_core.inference.fold import count_batchnorms, fold_batchnorm

    net = make_net()
    folded = fold_batchnorm(net)
    assert count_batchnorms(net) == 49 and count_batchnorms(folded) == 0
    x = torch.from_numpy(to_network_input(patches))
    with torch.no_grad():
        assert torch.max(torch.abs(folded(x) - net(x))) <= 1e-4
    # The original network is left untouched.
    assert count_batchnorms(net) == 49


@pytest.mark.slow
def test_exported_network_leaves_no_pad_before_a_conv(make_net, tmp_path):
    """Stride-2 SAME pads carry an explicit zero, so ONNX Runtime folds them into their convs."""
    import onnx
    import onnxruntime as ort

    from spacer_core.inference.compile import export_onnx

    model = export_onnx(make_net())
    exported = onnx.load_from_string(model)
    assert all(len(n.input) >= 3 and n.input[2] for n in exported.graph.node if n.op_type == "Pad")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimised.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 81
    for conv in convs:
        source = producers.get(conv.input[0])
        while source is not None and source.op_type in ("ReorderInput", "ReorderOutput"):
            source = producers.get(source.input[0])
        assert source is None or source.op_type != "Pad", conv.name
    assert not [n for n in graph.node if n.op_type in ("Pad", "Cast")]


def test_artifacts_of_older_formats_are_not_reused(efficientnet_weights, tmp_path):  # noqa: F811
    path = compile_cache.artifact_path(tmp_path, efficientnet_weights.sha256, "onnx", "exact-cpu", ".onnx")
    assert f".f{compile_cache.ARTIFACT_FORMAT}." in path.name and compile_cache.ARTIFACT_FORMAT >= 2


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3, 4, 8, 13])
def test_onnx_sessions_split_a_batch_and_keep_its_order(
    n,
    efficientnet_weights,
    make_net,
    patches,
    shared_cache,  # noqa: F811
):
    backend = load_backend(
        efficientnet_weights.sha256, make_net, device="cpu", kind="onnxruntime", cache_dir=shared_cache
    )
    assert isinstance(backend, OnnxBackend)
    one = OnnxBackend(_artifact(shared_cache, efficientnet_weights.sha256), sessions=1, threads=1)
    two = OnnxBackend(_artifact(shared_cache, efficientnet_weights.sha256), sessions=2, threads=2)
    assert (two.sessions, two.threads, two.parallelism) == (2, 1, 2)
    assert (one.sessions, one.parallelism) == (1, 1)
    batch = to_network_input(np.concatenate([patches] * 3)[:n])
    expected = one.run(batch)
    assert np.array_equal(two.run(batch), expected)
    # A whole request of uint8 crops: each session converts its own pieces, as ToTensor does.
    crops = np.ascontiguousarray((batch.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
    assert np.array_equal(two.run_patches(crops), one.run(to_network_input(crops)))


def test_onnx_sessions_serve_concurrent_callers(efficientnet_weights, make_net, patches, shared_cache):  # noqa: F811
    import concurrent.futures

    load_backend(
        efficientnet_weights.sha256, make_net, device="cpu", kind="onnxruntime", cache_dir=shared_cache
    )
    backend = OnnxBackend(_artifact(shared_cache, efficientnet_weights.sha256), sessions=2, threads=2)
    batches = [to_network_input(np.roll(patches, k, axis=0)[: 2 + k]) for k in range(4)]
    expected = [backend.run(b) for b in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            got = list(pool.map(backend.run, batches))
            for g, e in zip(got, expected):
                assert np.array_equal(g, e)


def test_onnx_sessions_share_one_request_piece_by_piece(efficientnet_weights, make_net, shared_cache):  # noqa: F811
    """One caller's request keeps every session busy, and a failing piece fails the call cleanly."""
    load_backend(
        efficientnet_weights.sha256, make_net, device="cpu", kind="onnxruntime", cache_dir=shared_cache
    )
    backend = OnnxBackend(_artifact(shared_cache, efficientnet_weights.sha256), sessions=2, threads=2)
    threads: set[str] = set()
    run = backend._call

    def recording(slot, piece):
        threads.add(threading.current_thread().name)
        return run(slot, piece)

    backend._call = recording  # type: ignore[method-assign]
    crops = np.random.default_rng(3).integers(0, 256, (24, 224, 224, 3), dtype=np.uint8)
    features = backend.run_patches(crops)
    assert features.shape == (24, 1280) and len(threads) == 2

    def failing(slot, piece):
        if (piece[0] == np.float32(1)).all():
            raise RuntimeError("piece failed")
        return run(slot, piece)

    crops[8] = 255  # the first patch of the third piece
    backend._call = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="piece failed"):
        backend.run_patches(crops)
    backend._call = run  # type: ignore[method-assign]
    crops[8] = 0
    assert backend.run_patches(crops).shape == (24, 1280)  # every session went back to the pool


def _artifact(folder, sha256):
    path = compile_cache.artifact_path(folder, sha256, "onnx", "exact-cpu", ".onnx")
    assert path.exists()
    return path
