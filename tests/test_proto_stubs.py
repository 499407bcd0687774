"""The committed gRPC stubs match proto/ and import as server._proto."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("grpc_tools")


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation():
    stale = _gen_proto().stale_files()
    assert stale == [], f"stubs are stale, run `python scripts/gen_proto.py`: {stale}"


def test_stale_check_detects_an_edited_stub(tmp_path):
    gen = _gen_proto()
    committed = tmp_path / "committed"
    gen.generate(committed)
    assert gen.stale_files(committed) == []
    pb2 = committed / "spacer" / "v1" / "spacer_pb2.py"
    pb2.write_text(pb2.read_text() + "\n# edited\n")
    assert gen.stale_files(committed) == ["spacer/v1/spacer_pb2.py"]


def test_generated_imports_resolve_inside_the_server_package():
    from server._proto.spacer.v1 import spacer_pb2, spacer_pb2_grpc

    text = (ROOT / "server/_proto/spacer/v1/spacer_pb2_grpc.py").read_text()
    assert "from server._proto.spacer.v1 import spacer_pb2" in text
    assert "from spacer.v1 import" not in text
    service = spacer_pb2.DESCRIPTOR.services_by_name["Spacer"]
    assert service.full_name == "spacer.v1.Spacer"
    assert {m.name for m in service.methods} >= {
        "ExtractFeatures", "ClassifyFeatures", "ClassifyImage", "ClassifyImages",
        "TrainClassifier", "RunJob", "LoadModel", "ListModels",
    }
    assert hasattr(spacer_pb2_grpc, "SpacerStub")


def test_field_names_follow_pyspacer_messages():
    from server._proto.spacer.v1 import spacer_pb2 as pb

    def fields(msg):
        return set(msg.DESCRIPTOR.fields_by_name)

    assert fields(pb.ExtractFeaturesRequest) >= {"job_token", "extractor", "rowcols", "image_loc", "feature_loc"}
    assert fields(pb.ClassifyImageRequest) >= {"job_token", "extractor", "rowcols", "image_loc", "classifier_loc"}
    assert fields(pb.ClassifyFeaturesRequest) >= {"job_token", "feature_loc", "classifier_loc"}
    assert fields(pb.TrainClassifierRequest) >= {
        "job_token", "trainer", "nbr_epochs", "clf_type", "labels",
        "previous_model_locs", "model_loc", "valresult_loc", "feature_cache_dir",
    }
    assert fields(pb.ClassifyResponse) >= {"runtime", "scores", "classes", "valid_rowcol"}
    assert fields(pb.TrainResult) >= {"acc", "pc_accs", "ref_accs", "runtime"}
