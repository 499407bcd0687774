"""The committed generated modules match proto/ and import as server._proto.

Every file scripts/gen_proto.py makes (all of proto/ and the Caffe schema) is
checked two ways: its meaning (the serialized FileDescriptorProto, the RPC
paths) against protoc's output now, under any grpcio-tools; and its exact
text, only under the pinned generator (pyproject.toml's test extra).
"""

import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("grpc_tools")


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


gen = _gen_proto()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh generation of every stub, laid out as in the repository: (root, relative paths)."""
    root = tmp_path_factory.mktemp("fresh")
    return root, gen.generate_tree(root)


def _descriptor(path):
    return descriptor_pb2.FileDescriptorProto.FromString(gen.serialized_descriptor(path))


def _method_paths(text):
    return set(re.findall(r"'(/[\w.]+/\w+)'", text))


def descriptor_differences(committed_root, fresh_root, files):
    """Generated modules whose committed descriptor or RPC paths differ from the fresh ones."""
    differ = []
    for rel in files:
        committed = committed_root / rel
        if rel.name.endswith("_pb2.py"):
            if not committed.exists() or _descriptor(committed) != _descriptor(fresh_root / rel):
                differ.append(str(rel))
        elif rel.name.endswith("_pb2_grpc.py"):
            if not committed.exists() or _method_paths(committed.read_text()) != _method_paths(
                (fresh_root / rel).read_text()
            ):
                differ.append(str(rel))
    return differ


def test_every_generated_file_is_committed_and_nothing_else(fresh):
    root, files = fresh
    assert {p.name for p in files} >= {"spacer_pb2.py", "spacer_pb2_grpc.py", "caffe_pb2.py"}
    assert set(gen.committed_tree()) == set(files), "run `make proto` and commit server/_proto"


def test_committed_descriptors_match_the_protos(fresh):
    """What the code means: each _pb2 registers the FileDescriptorProto protoc makes from proto/ now.

    Holds whatever grpcio-tools is installed (a patch release changes version
    stamps, not descriptors); the service stubs must name the same RPCs.
    """
    root, files = fresh
    modules = [rel for rel in files if rel.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert len(modules) >= 3
    assert descriptor_differences(ROOT, root, modules) == [], "stale stubs: run `make proto`"


def test_committed_stubs_are_the_pinned_generators_exact_output():
    pinned, installed = gen.pinned_generator(), gen.installed_generator()
    if installed != pinned:
        pytest.skip(
            f"grpcio-tools {installed} is installed; the stubs are the output of the pinned "
            f"grpcio-tools=={pinned} (pyproject.toml), so their exact text is compared only under "
            f"it (`make deps` installs it); the descriptor test still checks their meaning"
        )
    stale = gen.stale_files()
    assert stale == [], f"stubs are stale, run `make proto`: {stale}"


def test_committed_stubs_carry_the_pinned_generators_version_stamp():
    """A changed pin with stubs left from the old generator fails under any installed version."""
    pinned = gen.pinned_generator()
    stamps = {
        str(rel): re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", (ROOT / rel).read_text(), re.MULTILINE)
        for rel in gen.committed_tree()
        if rel.name.endswith("_pb2_grpc.py")
    }
    assert stamps
    assert {rel: m[1] for rel, m in stamps.items() if m} == {rel: pinned for rel, m in stamps.items() if m}


def test_the_generator_pin_is_read_from_pyproject(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.optional-dependencies]\ntest = ["pytest", "grpcio-tools==1.2.3"]\n')
    assert gen.pinned_generator(pyproject) == "1.2.3"
    pyproject.write_text('[project.optional-dependencies]\ntest = ["grpcio-tools>=1.2,<1.3"]\n')
    with pytest.raises(ValueError, match="pinned exactly"):
        gen.pinned_generator(pyproject)


def test_descriptor_check_detects_a_changed_message(fresh, tmp_path):
    root, files = fresh
    committed = tmp_path / "committed"
    shutil.copytree(root, committed)
    modules = [rel for rel in files if rel.name.endswith(("_pb2.py", "_pb2_grpc.py"))]
    assert descriptor_differences(committed, root, modules) == []
    rel = next(rel for rel in modules if rel.name == "spacer_pb2.py")
    path = committed / rel
    old = gen.serialized_descriptor(path)
    proto = descriptor_pb2.FileDescriptorProto.FromString(old)
    field = descriptor_pb2.FieldDescriptorProto
    proto.message_type[0].field.add(
        name="added", number=999, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL
    )
    lines = path.read_text().splitlines(keepends=True)
    call = next(
        n
        for n in ast.walk(ast.parse("".join(lines)))
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "AddSerializedFile"
    )
    literal = call.args[0]
    assert literal.lineno == literal.end_lineno
    line = lines[literal.lineno - 1]
    lines[literal.lineno - 1] = (
        line[: literal.col_offset] + repr(proto.SerializeToString()) + line[literal.end_col_offset :]
    )
    path.write_text("".join(lines))
    assert gen.serialized_descriptor(path) != old
    assert descriptor_differences(committed, root, modules) == [str(rel)]


def test_descriptor_check_detects_a_missing_rpc(fresh, tmp_path):
    root, files = fresh
    committed = tmp_path / "committed"
    shutil.copytree(root, committed)
    rel = next(rel for rel in files if rel.name == "spacer_pb2_grpc.py")
    path = committed / rel
    path.write_text(path.read_text().replace("'/spacer.v1.Spacer/ListModels'", "'/spacer.v1.Spacer/Gone'"))
    assert descriptor_differences(committed, root, [rel]) == [str(rel)]


def test_stale_check_detects_an_edited_stub(fresh, tmp_path):
    root, files = fresh
    committed = tmp_path / "committed"
    shutil.copytree(root, committed)
    assert gen.stale_files(committed) == []
    pb2 = committed / "server/_proto/spacer/v1/spacer_pb2.py"
    pb2.write_text(pb2.read_text() + "\n# edited\n")
    (committed / "server/_proto/spacer/v1/orphan_pb2.py").write_text("")
    assert gen.stale_files(committed) == [
        "server/_proto/spacer/v1/orphan_pb2.py",
        "server/_proto/spacer/v1/spacer_pb2.py",
    ]


def test_generated_imports_resolve_inside_the_server_package():
    from server._proto.spacer.v1 import spacer_pb2, spacer_pb2_grpc

    text = (ROOT / "server/_proto/spacer/v1/spacer_pb2_grpc.py").read_text()
    assert "from server._proto.spacer.v1 import spacer_pb2" in text
    assert "from spacer.v1 import" not in text
    service = spacer_pb2.DESCRIPTOR.services_by_name["Spacer"]
    assert service.full_name == "spacer.v1.Spacer"
    assert {m.name for m in service.methods} >= {
        "ExtractFeatures",
        "ClassifyFeatures",
        "ClassifyImage",
        "ClassifyImages",
        "TrainClassifier",
        "RunJob",
        "LoadModel",
        "ListModels",
    }
    assert hasattr(spacer_pb2_grpc, "SpacerStub")


def test_field_names_follow_pyspacer_messages():
    from server._proto.spacer.v1 import spacer_pb2 as pb

    def fields(msg):
        return set(msg.DESCRIPTOR.fields_by_name)

    assert fields(pb.ExtractFeaturesRequest) >= {
        "job_token",
        "extractor",
        "rowcols",
        "image_loc",
        "feature_loc",
    }
    assert fields(pb.ClassifyImageRequest) >= {
        "job_token",
        "extractor",
        "rowcols",
        "image_loc",
        "classifier_loc",
    }
    assert fields(pb.ClassifyFeaturesRequest) >= {"job_token", "feature_loc", "classifier_loc"}
    assert fields(pb.TrainClassifierRequest) >= {
        "job_token",
        "trainer",
        "nbr_epochs",
        "clf_type",
        "labels",
        "previous_model_locs",
        "model_loc",
        "valresult_loc",
        "feature_cache_dir",
    }
    assert fields(pb.ClassifyResponse) >= {"runtime", "scores", "classes", "valid_rowcol"}
    assert fields(pb.TrainResult) >= {"acc", "pc_accs", "ref_accs", "runtime"}
