"""A real `spacer serve` (default flags: its working directory is its only data root) given hostile input.

Pickles that name only allowed NumPy and scikit-learn globals but build
object dtypes or odd attributes; images in formats that run programs
(EPS, PostScript) or that no survey photo comes in; decompression bombs;
control characters in what gets logged; NUL bytes, over-long names, deeply
nested JSON and abstract extractor class paths.

The server is a process of its own, so a crash shows as a dead process,
and its PATH starts with a folder of fake `gs` (Ghostscript) and friends
that leave a marker file when run. After every case: the status code is
the expected one and the message names the input without tracebacks,
server paths or reprs; the process is alive, no marker exists, nothing new
appeared outside the data root, health is SERVING and a normal ClassifyImage
still answers.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.testing import extractor_json, make_classifier, make_image, png_header
from tests.support.hostile_pickles import (
    costly_variants,
    mismatched_variants,
    overflowing_classifier,
    variants,
)

Code = grpc.StatusCode
# Programs Pillow plugins (and image tools) could hand data to.
FAKE_PROGRAMS = ("gs", "gsc", "gswin64c", "convert", "magick", "djpeg", "cjpeg", "xdg-open", "display")
LEAKS = re.compile(r"Traceback|site-packages|dist-packages|File \"|\b0x[0-9a-fA-F]{6,}|/tmp/")


# ---------------------------------------------------------------- hostile images


def _saved(fmt: str, mode: str = "RGB", size: tuple[int, int] = (16, 16), **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "1") else (10, 120, 200)).save(buffer, fmt, **options)
    return buffer.getvalue()


# A PostScript program that would write a file if Ghostscript ran it.
_PS_BODY = (
    b"/f (pwned-by-ps) (w) file def f (x) writestring f closefile\n0 0 moveto 10 10 lineto stroke showpage\n"
)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n" + _PS_BODY + b"%%EOF\n"
PS = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 16 16\n" + _PS_BODY
# DOS EPS: a binary header pointing at the PostScript section.
EPS_BINARY = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(EPS), 0, 0, 0, 0, 0xFFFF) + EPS


def _gif_bomb(width: int, height: int) -> bytes:
    data = bytearray(_saved("GIF", "L", (8, 8)))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def _bmp_bomb(width: int, height: int) -> bytes:
    data = bytearray(_saved("BMP", "L", (8, 8)))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _tiff_bomb(width: int, height: int) -> bytes:
    """A little-endian TIFF whose first IFD claims width x height, 8-bit gray, one strip."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 64),
    ]
    ifd = (
        struct.pack("<H", len(tags))
        + b"".join(
            struct.pack("<HHI", tag, kind, 1)
            + (struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0))
            for tag, kind, value in tags
        )
        + struct.pack("<I", 0)
    )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 64


def _webp_bomb() -> bytes:
    """A lossless WebP whose header claims 16384 x 16384 pixels (the format's largest)."""
    data = bytearray(_saved("WEBP", "RGB", (8, 8), lossless=True))
    at = data.index(b"VP8L") + 8 + 1  # chunk header, then the 0x2f signature
    bits = (16383) | (16383 << 14) | (int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1))
    data[at : at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


NOT_SURVEY_FORMATS: dict[str, Callable[[], bytes]] = {
    "eps": lambda: EPS,
    "eps-binary-header": lambda: EPS_BINARY,
    "postscript": lambda: PS,
    "pillow-eps": lambda: _saved("EPS"),
    "pdf": lambda: _saved("PDF"),
    "xbm": lambda: _saved("XBM", "1"),
    "ppm": lambda: _saved("PPM"),
    "pcx": lambda: _saved("PCX"),
    "tga": lambda: _saved("TGA"),
    "sgi": lambda: _saved("SGI"),
    "msp": lambda: _saved("MSP", "1"),
    "dds": lambda: _saved("DDS"),
    "icns": lambda: _saved("ICNS", "RGB", (16, 16)),
    "ico": lambda: _saved("ICO", "RGB", (16, 16)),
    "jpeg2000": lambda: _saved("JPEG2000"),
}

BOMBS: dict[str, tuple[Callable[[], bytes], tuple[Code, ...]]] = {
    # Over twice the pixel limit: Pillow's own DecompressionBombError.
    "gif-65000x65000": (lambda: _gif_bomb(65000, 65000), (Code.RESOURCE_EXHAUSTED,)),
    "bmp-60000x60000": (lambda: _bmp_bomb(60000, 60000), (Code.RESOURCE_EXHAUSTED,)),
    "tiff-60000x60000": (lambda: _tiff_bomb(60000, 60000), (Code.RESOURCE_EXHAUSTED,)),
    "png-100000x100000": (lambda: png_header(100_000, 100_000), (Code.RESOURCE_EXHAUSTED,)),
    # Between the limit and twice it: Pillow only warns; the library refuses.
    "gif-12000x12000": (lambda: _gif_bomb(12000, 12000), (Code.RESOURCE_EXHAUSTED,)),
    "bmp-11000x11000": (lambda: _bmp_bomb(11000, 11000), (Code.RESOURCE_EXHAUSTED,)),
    "webp-16384x16384": (_webp_bomb, (Code.RESOURCE_EXHAUSTED,)),
}


# ---------------------------------------------------------------- the server


def _fake_programs(folder: Path, marker: Path) -> None:
    folder.mkdir()
    for name in FAKE_PROGRAMS:
        program = folder / name
        program.write_text(f'#!/bin/sh\necho "$0 $*" >> "{marker}"\nexit 1\n')
        program.chmod(program.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def env(tmp_path_factory, efficientnet_weights) -> Iterator[SimpleNamespace]:  # noqa: F811
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    marker = outside / "program-ran"
    _fake_programs(base / "bin", marker)
    weights = root / "efficientnet_b0.pt"
    shutil.copyfile(efficientnet_weights.path, weights)
    make_image(root / "good.png", 64, 48, seed=4)
    make_classifier(root / "clf.pkl")
    for name, data in {**variants(), **costly_variants(), **mismatched_variants()}.items():
        (root / f"{name}.pkl").write_bytes(data)
    (root / "overflowing.pkl").write_bytes(overflowing_classifier())
    ImageFeatures.make_random([1, 2], feature_dim=1280).store(
        DataLocation("filesystem", str(root / "features.json"))
    )
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neg-inf", -np.inf)):
        features = ImageFeatures.make_random([1, 2], feature_dim=1280)
        feat = features.feat.copy()
        feat[1, 7] = value
        ImageFeatures.from_arrays(feat, rows=[0, 1], cols=[0, 1]).store(
            DataLocation("filesystem", str(root / f"features-{name}.featurevector"))
        )
    path = f"{base / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    # Default flags: ServeProcess runs `spacer serve` in `root` with it as the data root, the default.
    process = ServeProcess(root, env={"PATH": path, "SPACER_LOG_LEVEL": "INFO"})
    with process, SpacerClient(process.address, timeout=120, max_attempts=2) as client:
        yield SimpleNamespace(
            root=root,
            outside=outside,
            marker=marker,
            client=client,
            process=process,
            extractor=extractor_json(weights, efficientnet_weights.sha256),
        )


def fs(path: Any) -> dict[str, Any]:
    return {"storage_type": "filesystem", "key": str(path), "bucket_name": None}


def _classify_ok(e: SimpleNamespace) -> None:
    reply = e.client.classify_image(
        e.extractor, [(1, 1), (40, 60)], fs(e.root / "good.png"), fs(e.root / "clf.pkl")
    )
    assert len(reply.scores) == 2


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    call: Callable[[SimpleNamespace], Any]
    codes: tuple[Code, ...]
    names: tuple[str, ...]  # what the reply's details must hold
    within: float = 0.0  # when set: seconds the server may take to answer


def _load(name: str) -> Callable[[SimpleNamespace], Any]:
    return lambda e: e.client.load_model(classifier_loc=fs(e.root / name))


def _classify_features(clf: str) -> Callable[[SimpleNamespace], Any]:
    return lambda e: e.client.classify_features(fs(e.root / "features.json"), fs(e.root / clf))


def _inline(data: Callable[[], bytes], rpc: str, token: str) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        if rpc == "extract":
            return e.client.extract_features(
                e.extractor, [(1, 1)], data(), return_features=True, job_token=token
            )
        return e.client.classify_image(e.extractor, [(1, 1)], data(), fs(e.root / "clf.pkl"), job_token=token)

    return call


def _image_file(name: str, data: Callable[[], bytes]) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        (e.root / name).write_bytes(data())
        return e.client.classify_image(e.extractor, [(1, 1)], fs(e.root / name), fs(e.root / "clf.pkl"))

    return call


def _run_job(text: Callable[[SimpleNamespace], str]) -> Callable[[SimpleNamespace], Any]:
    return lambda e: e.client.run_job(text(e))


def _extract_job(class_path: str) -> Callable[[SimpleNamespace], str]:
    def text(e: SimpleNamespace) -> str:
        task = {
            "job_token": "abstract",
            "extractor": dict(e.extractor, class_path=class_path),
            "rowcols": [[1, 1]],
            "image_loc": fs(e.root / "good.png"),
            "feature_loc": fs(e.root / "abstract.featurevector"),
        }
        return json.dumps({"task_name": "extract_features", "tasks": [task]})

    return text


PICKLE_CASES = [
    Case(f"pickle-{name}", _load(f"{name}.pkl"), (Code.INVALID_ARGUMENT,), (f"{name}.pkl",))
    for name in variants()
]
PICKLE_CASES += [
    Case(
        f"classify-features-{name}",
        _classify_features(f"{name}.pkl"),
        (Code.INVALID_ARGUMENT,),
        (f"{name}.pkl",),
    )
    for name in ("dtype-setstate-object-field", "scalar-object-field", "structured-dtype-object-field")
]

FORMAT_CASES = [
    Case(
        f"format-{name}-{rpc}",
        _inline(data, rpc, f"fmt-{name}"),
        (Code.INVALID_ARGUMENT,),
        (f"fmt-{name}", "not a JPEG, PNG, TIFF, BMP, GIF or WebP image"),
    )
    for name, data in NOT_SURVEY_FORMATS.items()
    for rpc in ("extract", "classify")
]
FORMAT_CASES += [
    Case(
        "format-eps-file", _image_file("drawing.eps", lambda: EPS), (Code.INVALID_ARGUMENT,), ("drawing.eps",)
    ),
    Case(
        "format-eps-named-jpg",
        _image_file("photo.jpg", lambda: EPS),
        (Code.INVALID_ARGUMENT,),
        ("photo.jpg",),
    ),
]
FORMAT_CASES += [
    Case(f"bomb-{name}", _inline(data, "classify", f"bomb-{name}"), codes, (f"bomb-{name}",))
    for name, (data, codes) in BOMBS.items()
]

ABSTRACT = (
    "spacer_core.extractors.base.FeatureExtractor",
    "spacer.extractors.base.FeatureExtractor",
    "spacer_core.extractors.torch_extractors.TorchExtractor",
)
DEEP = "[" * 100_000 + "]" * 100_000

CATEGORY_CASES = [
    Case(
        "nul-in-image-path",
        lambda e: e.client.classify_image(
            e.extractor, [(1, 1)], fs(f"{e.root}/good.png\0.jpg"), fs(e.root / "clf.pkl")
        ),
        (Code.INVALID_ARGUMENT,),
        ("NUL",),
    ),
    Case(
        "nul-in-classifier-path",
        lambda e: e.client.load_model(classifier_loc=fs(f"{e.root}/clf\0.pkl")),
        (Code.INVALID_ARGUMENT,),
        ("NUL",),
    ),
    Case(
        "nul-in-feature-path",
        lambda e: e.client.extract_features(
            e.extractor, [(1, 1)], fs(e.root / "good.png"), fs(f"{e.root}/out\0.featurevector")
        ),
        (Code.INVALID_ARGUMENT,),
        ("NUL",),
    ),
    Case("name-too-long-read", _load("x" * 300 + ".pkl"), (Code.INVALID_ARGUMENT,), ("name too long",)),
    Case(
        "name-too-long-write",
        lambda e: e.client.extract_features(
            e.extractor, [(1, 1)], fs(e.root / "good.png"), fs(e.root / ("f" * 300 + ".featurevector"))
        ),
        (Code.INVALID_ARGUMENT,),
        ("name too long",),
    ),
    # Longer than the key limit: refused before the filesystem sees it.
    Case(
        "path-too-long", _load("d/" * 3000 + "clf.pkl"), (Code.RESOURCE_EXHAUSTED,), ("classifier_loc.key",)
    ),
    Case(
        "path-near-the-key-limit", _load("d/" * 1900 + "clf.pkl"), (Code.NOT_FOUND,), ("/d/d/", "characters)")
    ),
    Case("path-through-a-file", _load("clf.pkl/inner.pkl"), (Code.INVALID_ARGUMENT,), ("inner.pkl",)),
    Case("deep-json-array", _run_job(lambda e: DEEP), (Code.INVALID_ARGUMENT,), ("job_msg_json", "nested")),
    Case(
        "deep-json-in-task",
        _run_job(lambda e: '{"task_name": "extract_features", "tasks": ' + DEEP + "}"),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "nested"),
    ),
    *(
        Case(
            f"abstract-extractor-{i}",
            lambda e, p=path: e.client.classify_image(
                dict(e.extractor, class_path=p), [(1, 1)], fs(e.root / "good.png"), fs(e.root / "clf.pkl")
            ),
            (Code.INVALID_ARGUMENT,),
            (path,),
        )
        for i, path in enumerate(ABSTRACT)
    ),
    Case(
        "abstract-extractor-runjob",
        _run_job(_extract_job(ABSTRACT[0])),
        (Code.INVALID_ARGUMENT,),
        (ABSTRACT[0],),
    ),
    Case(
        "url-internal-name",
        lambda e: e.client.load_model(
            classifier_loc={"storage_type": "url", "key": "http://localhost:9/clf.pkl", "bucket_name": None}
        ),
        (Code.PERMISSION_DENIED,),
        ("http://localhost:9/clf.pkl",),
    ),
]


def _classify_image(clf: str) -> Callable[[SimpleNamespace], Any]:
    return lambda e: e.client.classify_image(
        e.extractor, [(1, 1), (40, 60)], fs(e.root / "good.png"), fs(e.root / clf)
    )


# Allowed callables given arguments that would take minutes of CPU (punycode,
# a 512 KiB seed) or a state NumPy would read out of bounds: refused at once.
COSTLY_CASES = [
    Case(f"costly-{name}", _load(f"{name}.pkl"), (Code.INVALID_ARGUMENT,), (f"{name}.pkl",), within=2.0)
    for name in costly_variants()
]
COSTLY_CASES += [
    Case(
        "costly-classify-features-codec-punycode",
        _classify_features("codec-punycode.pkl"),
        (Code.INVALID_ARGUMENT,),
        ("codec-punycode.pkl", "latin-1"),
        within=2.0,
    ),
    Case(
        "costly-classify-image-seed",
        _classify_image("seed-in-classifier.pkl"),
        (Code.INVALID_ARGUMENT,),
        ("seed-in-classifier.pkl", "4194304 bits"),
        within=2.0,
    ),
]
# Classifiers whose arrays disagree: refused when loaded, not INTERNAL when scoring.
MISMATCH_CASES = [
    Case(
        f"mismatch-{rpc}-{name}", call(f"{name}.pkl"), (Code.INVALID_ARGUMENT,), (f"{name}.pkl",), within=5.0
    )
    for name in mismatched_variants()
    if name != "mlp-width-undeclared"
    for rpc, call in (
        ("load", _load),
        ("classify-features", _classify_features),
        ("classify-image", _classify_image),
    )
]
MISMATCH_CASES += [
    # No declared width: the weights' own width is checked before scikit-learn runs.
    Case(
        "mismatch-classify-features-mlp-width-undeclared",
        _classify_features("mlp-width-undeclared.pkl"),
        (Code.FAILED_PRECONDITION,),
        ("features.json", "dimension 1280", "dimension 5"),
        within=5.0,
    ),
    Case(
        "mismatch-classify-image-mlp-width-undeclared",
        _classify_image("mlp-width-undeclared.pkl"),
        (Code.FAILED_PRECONDITION,),
        ("dimension 1280", "dimension 5"),
        within=10.0,
    ),
]
NONFINITE_CASES = [
    Case(
        f"features-{name}",
        lambda e, n=name: e.client.classify_features(
            fs(e.root / f"features-{n}.featurevector"), fs(e.root / "clf.pkl")
        ),
        (Code.INVALID_ARGUMENT,),
        (f"features-{name}.featurevector", "NaN or infinite"),
        within=5.0,
    )
    for name in ("nan", "inf", "neg-inf")
] + [
    # Finite weights whose scores overflow to NaN: no reply carries them.
    Case(
        "scores-overflow",
        lambda e: e.client.classify_features(fs(e.root / "features.json"), fs(e.root / "overflowing.pkl")),
        (Code.INVALID_ARGUMENT,),
        ("not finite",),
        within=5.0,
    ),
]


def _oip_stub(e: SimpleNamespace) -> Any:
    from server._proto.inference import grpc_service_pb2_grpc as ipbg

    if not hasattr(e, "oip"):
        e.oip = ipbg.GRPCInferenceServiceStub(grpc.insecure_channel(e.process.address))
    return e.oip


def _oip_load(name: str, clf: str) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        from server._proto.inference import grpc_service_pb2 as ipb

        config = ipb.ModelRepositoryParameter(string_param=json.dumps({"classifier": clf}))
        return _oip_stub(e).RepositoryModelLoad(
            ipb.RepositoryModelLoadRequest(model_name=name, parameters={"config": config}), timeout=30
        )

    return call


BIG = "9" * 5000  # past Python's 4300-digit limit for int()


def _with_big_int(e: SimpleNamespace) -> str:
    task = {
        "job_token": "big",
        "extractor": e.extractor,
        "rowcols": [[5, 5]],
        "image_loc": fs(e.root / "good.png"),
        "feature_loc": fs(e.root / "big.featurevector"),
    }
    return json.dumps({"task_name": "extract_features", "tasks": [task]}).replace("[[5, 5]]", f"[[{BIG}, 5]]")


def _wrong_type_job(field: str, value: Any) -> Callable[[SimpleNamespace], str]:
    def text(e: SimpleNamespace) -> str:
        task = {
            "job_token": "typed",
            "extractor": dict(e.extractor),
            "rowcols": [[1, 1]],
            "image_loc": fs(e.root / "good.png"),
            "feature_loc": fs(e.root / "typed.featurevector"),
        }
        if field.startswith("extractor."):
            task["extractor"][field.split(".", 1)[1]] = value
        else:
            task[field] = value
        return json.dumps({"task_name": "extract_features", "tasks": [task]})

    return text


def _feature_file(name: str, data: Callable[[], bytes]) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        (e.root / name).write_bytes(data())
        return e.client.classify_features(fs(e.root / name), fs(e.root / "clf.pkl"))

    return call


def _oip_features(value: float) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        from server._proto.inference import grpc_service_pb2 as ipb

        _oip_load("hostile_clf", "clf.pkl")(e)
        features = np.zeros((2, 1280), np.float32)
        features[1, 3] = value
        tensor = ipb.ModelInferRequest.InferInputTensor(name="FEATURES", datatype="FP32", shape=[2, 1280])
        return _oip_stub(e).ModelInfer(
            ipb.ModelInferRequest(
                model_name="hostile_clf", inputs=[tensor], raw_input_contents=[features.tobytes()]
            ),
            timeout=30,
        )

    return call


def _npz_features(rows: Any, cols: Any) -> Callable[[], bytes]:
    def data() -> bytes:
        import numpy as np

        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.array([1, 2, 1280], np.int64),
            rows=np.asarray(rows),
            cols=np.asarray(cols),
            feat=np.zeros((2, 1280), np.float32),
        )
        return buffer.getvalue()

    return data


def _weights_file(name: str, data: Callable[[SimpleNamespace], bytes]) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        import hashlib

        raw = data(e)
        (e.root / name).write_bytes(raw)
        extractor = dict(
            e.extractor,
            data_locations={"weights": fs(e.root / name)},
            data_hashes={"weights": hashlib.sha256(raw).hexdigest()},
        )
        return e.client.extract_features(extractor, [(1, 1)], fs(e.root / "good.png"), return_features=True)

    return call


OIP_CASES = [
    Case(
        f"oip-load-{name}",
        _oip_load(f"oip_{i}", f"{name}.pkl"),
        (Code.INVALID_ARGUMENT,),
        (f"{name}.pkl",),
        within=5.0,
    )
    for i, name in enumerate(
        ["codec-punycode", "seed-in-classifier", "classes-vs-score-columns", "mlp-first-layer-width"]
    )
] + [
    Case(
        f"oip-features-{name}",
        _oip_features(value),
        (Code.INVALID_ARGUMENT,),
        ("hostile_clf", "NaN or infinite"),
        within=5.0,
    )
    for name, value in (("nan", float("nan")), ("inf", float("inf")))
]


def _oip_load_config(name: str, config: str) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        from server._proto.inference import grpc_service_pb2 as ipb

        return _oip_stub(e).RepositoryModelLoad(
            ipb.RepositoryModelLoadRequest(
                model_name=name, parameters={"config": ipb.ModelRepositoryParameter(string_param=config)}
            ),
            timeout=60,
        )

    return call


FEATURE_JSON = {"point_features": [], "valid_rowcol": True, "feature_dim": 3, "npoints": 1}
INPUT_CASES = [
    # JSON a client sends or names: one parser, every failure the client's (never INTERNAL).
    Case(
        "runjob-int-past-digit-limit",
        _run_job(_with_big_int),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "digits"),
    ),
    Case(
        "feature-json-int-past-digit-limit",
        _feature_file("bigint.featurevector", lambda: f"[[{BIG}]]".encode()),
        (Code.INVALID_ARGUMENT,),
        ("bigint.featurevector",),
    ),
    Case(
        "feature-json-deep",
        _feature_file("deep.featurevector", lambda: DEEP.encode()),
        (Code.INVALID_ARGUMENT,),
        ("deep.featurevector",),
    ),
    Case(
        "feature-json-objects",
        _feature_file("objs.featurevector", lambda: b'[[{"a": 1}]]'),
        (Code.INVALID_ARGUMENT,),
        ("objs.featurevector",),
    ),
    Case(
        "oip-load-config-deep", _oip_load_config("deep", DEEP), (Code.INVALID_ARGUMENT,), ("deep", "nested")
    ),
    Case(
        "oip-load-config-int-past-digit-limit",
        _oip_load_config("bigint", '{"extractor": ' + BIG + "}"),
        (Code.INVALID_ARGUMENT,),
        ("bigint", "digits"),
    ),
    # Wrong types inside a message: the field's task is named, never an AttributeError.
    Case(
        "runjob-data-locations-list",
        _run_job(_wrong_type_job("extractor.data_locations", [1])),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]"),
    ),
    Case(
        "runjob-data-hashes-list",
        _run_job(_wrong_type_job("extractor.data_hashes", [1])),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]"),
    ),
    Case(
        "runjob-image-loc-number",
        _run_job(_wrong_type_job("image_loc", 5)),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]"),
    ),
    Case(
        "runjob-image-loc-no-key",
        _run_job(_wrong_type_job("image_loc", {"storage_type": "filesystem"})),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]", "key"),
    ),
    Case(
        "runjob-extractor-list",
        _run_job(_wrong_type_job("extractor", [1])),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]"),
    ),
    Case(
        "runjob-task-null",
        _run_job(lambda e: '{"task_name": "extract_features", "tasks": [null]}'),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks[0]"),
    ),
    Case(
        "runjob-task-name-list",
        _run_job(lambda e: '{"task_name": [], "tasks": []}'),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "task_name"),
    ),
    Case(
        "runjob-tasks-object",
        _run_job(lambda e: '{"task_name": "extract_features", "tasks": {"a": 1}}'),
        (Code.INVALID_ARGUMENT,),
        ("job_msg_json", "tasks"),
    ),
    # Point rows and columns read from a feature file: whole numbers in 0..2**31-1.
    Case(
        "feature-rows-past-int32",
        _feature_file("rows_huge.featurevector", _npz_features([2**31, 2**40], [1, 2])),
        (Code.INVALID_ARGUMENT,),
        ("rows_huge.featurevector", "row"),
    ),
    Case(
        "feature-rows-negative",
        _feature_file("rows_neg.featurevector", _npz_features([-1, 3], [1, 2])),
        (Code.INVALID_ARGUMENT,),
        ("rows_neg.featurevector", "row"),
    ),
    Case(
        "feature-cols-float",
        _feature_file("cols_float.featurevector", _npz_features([1, 2], [0.5, 1.5])),
        (Code.INVALID_ARGUMENT,),
        ("cols_float.featurevector", "cols"),
    ),
    # A weights file torch cannot load: one clean line naming it.
    Case(
        "weights-a-pickle",
        _weights_file("pickled.pt", lambda e: (e.root / "clf.pkl").read_bytes()),
        (Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT),
        ("pickled.pt",),
    ),
    Case(
        "weights-junk",
        _weights_file("junk.pt", lambda e: bytes(range(256)) * 20),
        (Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT),
        ("junk.pt",),
    ),
]


# Locations no store could take, refused at the one gate; and code files a
# client might plant where Python imports from.
LOCATION_CASES = [
    *(
        Case(
            f"s3-bucket-{i}",
            lambda e, b=bucket: e.client.load_model(
                classifier_loc={"storage_type": "s3", "key": "clf.pkl", "bucket_name": b}
            ),
            (Code.INVALID_ARGUMENT,),
            ("bucket",),
        )
        for i, bucket in enumerate(["b c", "b/c", "arn:aws:s3:::x", "", "b\nc"])
    ),
    Case(
        "oip-config-lone-surrogate-url",
        _oip_load_config(
            "surrogate", json.dumps({"classifier": {"storage_type": "url", "key": "http://\udc80/x"}})
        ),
        (Code.INVALID_ARGUMENT,),
        ("Unicode",),
        within=5.0,
    ),
    Case(
        "oip-config-lone-surrogate-bucket",
        _oip_load_config(
            "surrogate2",
            json.dumps({"classifier": {"storage_type": "s3", "key": "k", "bucket_name": "\ud800"}}),
        ),
        (Code.INVALID_ARGUMENT,),
        ("Unicode",),
        within=5.0,
    ),
    Case(
        "oip-config-key-a-number",
        _oip_load_config("numkey", json.dumps({"classifier": {"storage_type": "filesystem", "key": 5}})),
        (Code.INVALID_ARGUMENT,),
        ("must be text",),
    ),
    Case(
        "oip-config-url-key-an-object",
        _oip_load_config("objkey", json.dumps({"classifier": {"storage_type": "url", "key": {"a": 1}}})),
        (Code.INVALID_ARGUMENT,),
        ("must be text",),
    ),
    Case(
        "oip-config-bucket-a-list",
        _oip_load_config(
            "listbucket", json.dumps({"classifier": {"storage_type": "s3", "key": "k", "bucket_name": ["x"]}})
        ),
        (Code.INVALID_ARGUMENT,),
        ("text",),
    ),
    *(
        Case(
            f"write-code-file-{i}",
            lambda e, n=name: e.client.extract_features(
                e.extractor, [(1, 1)], fs(e.root / "good.png"), fs(e.root / n)
            ),
            (Code.PERMISSION_DENIED,),
            ("Python code",),
        )
        for i, name in enumerate(
            [
                "server.py",
                "server/__init__.py",
                "grpc_health.py",
                "sitecustomize.pth",
                "x.pyc",
                "mod.so",
                "server.py/",
                "numpy.py/.",
                "out/x.pth/",
            ]
        )
    ),
]

CASES = (
    PICKLE_CASES
    + FORMAT_CASES
    + CATEGORY_CASES
    + OIP_CASES
    + COSTLY_CASES
    + MISMATCH_CASES
    + NONFINITE_CASES
    + INPUT_CASES
    + LOCATION_CASES
)


def _listing(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_cleanly(env, case: Case):
    outside_before = _listing(env.outside)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        case.call(env)
    took = time.monotonic() - started
    assert not case.within or took < case.within, f"answered after {took:.1f} s"
    code, details = raised.value.code(), raised.value.details() or ""
    assert code in case.codes, (code, details)
    for name in case.names:
        assert name in details, (name, details)
    assert not LEAKS.search(details.replace(str(env.root), "<root>")), details
    assert "\n" not in details and "\x1b" not in details, details  # one clean line
    assert "internal error" not in details.lower(), details
    assert env.process.proc.poll() is None, "the server died"
    assert not env.marker.exists(), env.marker.read_text()
    assert _listing(env.outside) == outside_before
    assert not [p for p in env.root.rglob("*") if p.name.endswith(".tmp")]
    assert not list(env.root.glob("pwned*"))
    assert not [p for p in env.root.rglob("*") if p.suffix in (".py", ".pyc", ".pth", ".so")]
    assert env.client.health() == "SERVING"
    _classify_ok(env)


@pytest.mark.parametrize("name", ["amplified-encode", "amplified-arrays", "amplified-swapped-arrays"])
def test_pickles_that_copy_their_data_are_refused_before_the_copies_pile_up(env, name):
    """A 1 MiB string named 600 times would be 600 MiB of copies; the loader stops at the file's own size."""
    before = env.process.status()
    with pytest.raises(grpc.RpcError) as raised:
        env.client.load_model(classifier_loc=fs(env.root / f"{name}.pkl"))
    assert (
        raised.value.code() == Code.INVALID_ARGUMENT and "more bytes than it holds" in raised.value.details()
    )
    after = env.process.status()
    assert after.peak_rss_mib - before.peak_rss_mib < 150, (before, after)
    assert after.rss_mib - before.rss_mib < 150, (before, after)


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_internal_host_names_are_not_resolved_for_the_client(env):
    with pytest.raises(grpc.RpcError) as raised:
        env.client.load_model(
            classifier_loc={"storage_type": "url", "key": "http://localhost/x", "bucket_name": None}
        )
    details = raised.value.details()
    assert raised.value.code() == Code.PERMISSION_DENIED
    assert "127.0.0.1" not in details and "::1" not in details and "loopback" not in details, details
    assert "localhost" in env.process.log()  # the log keeps what the client is not told


CONTROL_TEXT = {
    "newline": "t1\n2026-01-01 00:00:00,000 INFO server.rpc: rpc method=Forged status=OK",
    "carriage-return": "t2\r2026-01-01 00:00:00,000 INFO server.rpc: rpc method=Forged status=OK",
    "escape-sequence": "t3\x1b[2K\x1b[1Arpc method=Forged status=OK",
    "line-separator": "t4\u2028rpc method=Forged status=OK",
    "nul-and-bell": "t5\x00\x07rpc method=Forged status=OK",
}


@pytest.mark.parametrize("kind", sorted(CONTROL_TEXT))
def test_client_text_cannot_forge_log_lines(env, kind):
    text = CONTROL_TEXT[kind]
    env.client.classify_image(
        env.extractor, [(1, 1)], fs(env.root / "good.png"), fs(env.root / "clf.pkl"), job_token=text
    )
    with pytest.raises(grpc.RpcError):  # a path with the text in it: NOT_FOUND, logged with the path
        env.client.classify_image(
            env.extractor,
            [(1, 1)],
            fs(env.root / f"{text}.png"),
            fs(env.root / "clf.pkl"),
            job_token="path-" + kind,
        )
    job = {
        "task_name": "classify_image",
        "tasks": [
            {
                "job_token": text,
                "extractor": env.extractor,
                "rowcols": [[1, 1]],
                "image_loc": fs(env.root / "good.png"),
                "classifier_loc": fs(env.root / "clf.pkl"),
            }
        ],
    }
    assert env.client.run_job(json.dumps(job))["ok"]
    log = env.process.log()
    # splitlines() also splits at \r and U+2028: a forged record would start a line.
    forged = [
        line for line in log.splitlines() if line.startswith(("2026-01-01", "rpc method=Forged", "\x1b"))
    ]
    assert not forged, forged
    assert not any(ch in log for ch in "\x1b\x00\x07\u2028"), "a control character reached the log"
    assert "\r" not in log
    escaped = text.split("rpc method=Forged")[0][2:].encode("unicode_escape").decode()[:4]
    assert escaped in log, (escaped, kind)


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@pytest.mark.parametrize(
    "token", ['q1" status=OK id=forged received=99', 'q2\\" status=OK id=forged', "q3 status=OK id=forged"]
)
def test_client_text_cannot_forge_log_fields(env, token):
    """A token is one quoted value in the call line: it cannot add a status=, id= or any field."""
    env.client.classify_image(
        env.extractor, [(1, 1)], fs(env.root / "good.png"), fs(env.root / "clf.pkl"), job_token=token
    )
    lines = [
        line
        for line in env.process.log().splitlines()
        if "rpc method=ClassifyImage" in line and "forged" in line
    ]
    assert lines
    for line in lines:
        fields = _FIELD.findall(line.split("rpc ", 1)[1])
        keys = [key for key, _ in fields]
        assert keys.count("status") == 1 and keys.count("id") == 1 and "received" in keys, line
        assert dict(fields)["id"] != "forged" and dict(fields)["status"] == "OK", line
        assert dict(fields)["token"].startswith('"'), line


def test_a_failed_jobs_token_cannot_forge_fields_in_the_error_lines(env):
    """A RunJob that fails logs its token as one quoted value in every line that names it."""
    token = "z1 ref=000000000000 context=FORGEDCTX"
    task = {
        "job_token": token,
        "extractor": env.extractor,
        "rowcols": [[1, 1]],
        "image_loc": fs(env.root / "missing.png"),
        "feature_loc": fs(env.root / "z1.featurevector"),
    }
    reply = env.client.run_job(json.dumps({"task_name": "extract_features", "tasks": [task]}))
    assert not reply["ok"]
    lines = [line for line in env.process.log().splitlines() if "FORGEDCTX" in line]
    assert lines
    for line in lines:
        assert " ref=000000000000" not in line.replace(f'"{token}"', "").replace(repr(token), ""), line


@pytest.mark.slow
def test_a_module_written_into_the_data_root_is_never_imported(tmp_path, efficientnet_weights):  # noqa: F811
    """`python -m shell serve` started in its data root: a client-written grpc_health.py
    (a module the server imports as it starts) or json.py is not imported in place of the real one."""
    root = tmp_path / "root"
    root.mkdir()
    marker = tmp_path / "shadow-ran"
    for module in ("grpc_health.py", "grpc_reflection.py", "sklearn.py", "torch.py"):
        (root / module).write_text(
            f"open({str(marker)!r}, 'w').write({module!r})\nraise SystemExit('shadowed')\n"
        )
    make_image(root / "good.png", 64, 48)
    make_classifier(root / "clf.pkl")
    weights = root / "efficientnet_b0.pt"
    shutil.copyfile(efficientnet_weights.path, weights)
    with ServeProcess(root) as process, SpacerClient(process.address, timeout=120) as client:
        assert client.health() == "SERVING"
        reply = client.classify_image(
            extractor_json(weights, efficientnet_weights.sha256),
            [(1, 1)],
            fs(root / "good.png"),
            fs(root / "clf.pkl"),
        )
        assert len(reply.scores) == 1
    assert not marker.exists(), marker.read_text()
