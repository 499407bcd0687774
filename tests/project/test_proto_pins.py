"""The stub generator's version, the stubs' runtime needs and pyproject's floors agree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto_pins", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _floor(package: str) -> tuple[int, ...]:
    match = re.search(rf'"{re.escape(package)}>=([\d.]+)', PYPROJECT)
    assert match, f"pyproject.toml has no floor for {package}"
    return _version(match.group(1))


def _stubs() -> list[Path]:
    return sorted((ROOT / "server" / "_proto").rglob("*_pb2*.py")) + [ROOT / "spacer_core/caffe/caffe_pb2.py"]


def test_floors_admit_exactly_what_the_stubs_need():
    for path in _stubs():
        text = path.read_text()
        grpc_needed = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)
        if grpc_needed:
            assert _floor("grpcio") >= _version(grpc_needed.group(1)), path
        gencode = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
        if gencode:
            made_by = tuple(int(g) for g in gencode.groups())
            assert made_by[0] == 6, f"{path}: gencode {made_by} would refuse protobuf 6 runtimes"
            assert _floor("protobuf") >= made_by, path
    assert re.search(r'"protobuf>=[\d.]+,<8"', PYPROJECT)


def test_the_inference_stubs_keep_their_own_descriptor_pool():
    text = (ROOT / "server/_proto/inference/grpc_service_pb2.py").read_text()
    assert "_descriptor_pool.DescriptorPool().AddSerializedFile" in text
    assert "_descriptor_pool.Default()" not in text


@pytest.mark.slow
def test_every_stub_imports_without_a_warning_on_this_runtime():
    modules = [
        "server._proto.spacer.v1.spacer_pb2_grpc",
        "server._proto.inference.grpc_service_pb2_grpc",
        "spacer_core.caffe.caffe_pb2",
    ]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, check=True)
