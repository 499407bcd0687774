"""Library failures reach clients as the right status code with a message naming the culprit."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from server import errors
from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from spacer_core import config as core_config
from spacer_core import crop, storage, urlfetch
from spacer_core import exceptions as exc
from spacer_core.data_classes import DataLocation
from spacer_core.testing import extractor_json, make_classifier, make_image
from spacer_core.testing import fs_loc as fs
from tests.support.grpc_server import running_server

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def data(tmp_path_factory, efficientnet_weights):  # noqa: F811
    root = tmp_path_factory.mktemp("errors")
    return {
        "root": root,
        "image": make_image(root / "small.png", 64, 48, seed=2),
        "clf": make_classifier(root / "clf.pkl"),
        "clf64": make_classifier(root / "clf64.pkl", feature_dim=64),
        "extractor": extractor_json(efficientnet_weights.path, efficientnet_weights.sha256),
    }


@pytest.fixture(scope="module")
def client():
    with running_server(workers=2) as server, SpacerClient(server.address, timeout=60) as c:
        yield c


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


@pytest.mark.parametrize(
    "rowcols, fragment",
    [([(48, 5)], "48"), ([(5, 64)], "64"), ([(-1, 5)], "-1")],
)
def test_point_outside_the_image_is_invalid_argument_naming_the_image(client, data, rowcols, fragment):
    err = rpc_error(client.classify_image, data["extractor"], rowcols, fs(data["image"]), fs(data["clf"]))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "small.png" in err.details() and fragment in err.details()


def test_undecodable_inline_image_is_invalid_argument_naming_the_token(client, data):
    err = rpc_error(
        client.classify_image,
        data["extractor"],
        [(1, 1)],
        b"not an image",
        fs(data["clf"]),
        job_token="junk-7",
    )
    assert err.code() == Code.INVALID_ARGUMENT
    assert "junk-7" in err.details()


def test_missing_inputs_are_invalid_argument(client, data):
    stub = client.stub
    err = rpc_error(stub.ClassifyImage, pb.ClassifyImageRequest(job_token="t"))
    assert err.code() == Code.INVALID_ARGUMENT and "image" in err.details()
    request = client.image_request(data["extractor"], [], fs(data["image"]), fs(data["clf"]))
    err = rpc_error(stub.ClassifyImage, request)
    assert err.code() == Code.INVALID_ARGUMENT and "rowcols" in err.details()
    bad_type = {"storage_type": "ftp", "key": "x", "bucket_name": None}
    err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], bad_type, fs(data["clf"]))
    assert err.code() == Code.INVALID_ARGUMENT and "ftp" in err.details()


def test_missing_file_is_not_found_and_memory_storage_is_not_offered(client, data):
    missing = data["root"] / "gone.jpg"
    err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], fs(missing), fs(data["clf"]))
    assert err.code() == Code.NOT_FOUND and "gone.jpg" in err.details()
    err = rpc_error(
        client.classify_image,
        data["extractor"],
        [(1, 1)],
        {"storage_type": "memory", "key": "no/such/key.jpg"},
        fs(data["clf"]),
    )
    assert err.code() == Code.PERMISSION_DENIED and "no/such/key.jpg" in err.details()
    assert "memory storage is not available" in err.details()


def test_weights_hash_mismatch_is_failed_precondition(client, data):
    extractor = dict(data["extractor"], data_hashes={"weights": "0" * 64})
    err = rpc_error(client.classify_image, extractor, [(1, 1)], fs(data["image"]), fs(data["clf"]))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "weights" in err.details()


def test_feature_dimension_mismatch_is_failed_precondition(client, data):
    err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], fs(data["image"]), fs(data["clf64"]))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "small.png" in err.details() and "64" in err.details()


def test_unreachable_s3_is_unavailable(client, data, monkeypatch):
    monkeypatch.setattr(core_config, "AWS_ENDPOINT_URL", "http://127.0.0.1:9", raising=False)
    monkeypatch.setenv("SPACER_AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "k"),
        ("AWS_SECRET_ACCESS_KEY", "s"),
        ("AWS_REGION", "us-east-1"),
    ):
        monkeypatch.setattr(core_config, name, value, raising=False)
    loc = {"storage_type": "s3", "key": "img.jpg", "bucket_name": "bucket"}
    err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], loc, fs(data["clf"]))
    assert err.code() == Code.UNAVAILABLE, err.details()


def test_limits_are_resource_exhausted(data):
    saved = core_config.MAX_POINTS_PER_IMAGE
    try:
        with running_server(max_points_per_image=2) as server, SpacerClient(server.address) as client:
            err = rpc_error(
                client.classify_image, data["extractor"], [(1, 1)] * 3, fs(data["image"]), fs(data["clf"])
            )
    finally:
        core_config.MAX_POINTS_PER_IMAGE = saved
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert "small.png" in err.details()


def test_message_over_the_size_limit_is_resource_exhausted(data):
    with running_server(max_message_bytes=256 * 1024) as server, SpacerClient(server.address) as client:
        err = rpc_error(
            client.classify_image, data["extractor"], [(1, 1)], b"\0" * (512 * 1024), fs(data["clf"])
        )
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert "larger than max" in err.details()
        # A message under the limit still goes through the server.
        buf = io.BytesIO()
        Image.open(data["image"]).save(buf, format="PNG")
        ok = client.classify_image(data["extractor"], [(1, 1)], buf.getvalue(), fs(data["clf"]))
        assert len(ok.scores) == 1


def test_default_message_limit_is_at_least_64_mib():
    from server.config import ServerConfig

    assert ServerConfig().max_message_bytes >= 64 * 1024 * 1024


def test_full_queue_is_resource_exhausted(data):
    many = [(r % 48, c % 64) for r, c in zip(range(0, 400, 7), range(0, 400, 5))]
    with (
        running_server(max_queue=1, workers=1) as server,
        SpacerClient(server.address, timeout=120) as client,
    ):
        started = threading.Event()
        outcome: dict = {}

        def slow():
            started.set()
            outcome["slow"] = client.classify_image(
                data["extractor"], many, fs(data["image"]), fs(data["clf"])
            )

        worker = threading.Thread(target=slow)
        worker.start()
        started.wait()
        admission = server.server.engine.admission
        deadline = time.monotonic() + 30
        while admission.active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert admission.active == 1, "the slow call was never admitted"
        err = rpc_error(
            client.classify_image, data["extractor"], [(1, 1)], fs(data["image"]), fs(data["clf"])
        )
        client.list_models()  # not an image task: never refused
        worker.join()
    assert err.code() == Code.RESOURCE_EXHAUSTED and "queue" in err.details()
    assert len(outcome["slow"].scores) == len(many)


def test_data_roots_restrict_filesystem_locations(data, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = make_image(allowed / "in.png", 64, 48)
    with (
        running_server(data_roots=(allowed, data["root"].parent)) as server,
        SpacerClient(server.address) as client,
    ):
        ok = client.classify_image(data["extractor"], [(1, 1)], fs(inside), fs(data["clf"]))
        assert len(ok.scores) == 1
    weights_dir = Path(data["extractor"]["data_locations"]["weights"]["key"]).parent
    with running_server(data_roots=(allowed, weights_dir)) as server, SpacerClient(server.address) as client:
        err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], fs(inside), fs(data["clf"]))
        assert err.code() == Code.PERMISSION_DENIED and "classifier_loc" in err.details()
        sneaky = fs(allowed / ".." / "outside.png")
        err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], sneaky, fs(data["clf"]))
        assert err.code() == Code.PERMISSION_DENIED and "outside.png" in err.details()
        err = rpc_error(client.classify_image, data["extractor"], [(1, 1)], fs(inside), fs(inside))
        assert err.code() != Code.PERMISSION_DENIED  # every location allowed: the library decides
    with running_server(data_roots=(allowed,)) as server, SpacerClient(server.address) as client:
        err = rpc_error(client.load_model, extractor=data["extractor"])
        assert err.code() == Code.PERMISSION_DENIED and "extractor.data_locations[weights]" in err.details()


def _shape(details: str, path: Path) -> str:
    return details.replace(str(path), "<path>")


def test_without_flags_the_server_is_confined_to_its_working_directory(data, tmp_path, monkeypatch):
    from server.config import ServerConfig

    home = tmp_path / "home"
    home.mkdir()
    inside = make_classifier(home / "clf.pkl")
    (home / "link.pkl").symlink_to(data["clf"])
    monkeypatch.chdir(home)
    config = ServerConfig(workers=2, log_level="WARNING")  # what `spacer serve` with no flags builds
    assert config.effective_data_roots() == (home.resolve(),)
    with running_server(config) as server, SpacerClient(server.address) as client:
        assert client.load_model(classifier_loc=fs(inside)).kind
        assert client.load_model(classifier_loc=fs("clf.pkl")).kind  # relative to the working directory
        refused = {}
        for name, loc in {
            "existing": data["clf"],
            "missing": data["root"] / "no-such-clf.pkl",
            "dotdot": home / ".." / "clf.pkl",
            "symlink": home / "link.pkl",
        }.items():
            err = rpc_error(client.load_model, classifier_loc=fs(loc))
            assert err.code() == Code.PERMISSION_DENIED, (name, err.details())
            assert str(loc) in err.details()
            refused[name] = _shape(err.details(), loc)
        # Refusals never tell an existing file from a missing one.
        assert len(set(refused.values())) == 1, refused


def test_allow_any_path_opts_out_and_is_logged_loudly(data, caplog):
    with caplog.at_level(logging.WARNING, logger="server"):
        with running_server(allow_any_path=True) as server, SpacerClient(server.address) as client:
            assert client.load_model(classifier_loc=fs(data["clf"])).kind
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "allow_any_path" in r.getMessage()
    ]
    assert warnings and "ANY file" in warnings[0].getMessage()


# ---------------------------------------------------------------- the mapping itself


@pytest.mark.parametrize(
    "error, code",
    [
        (exc.RowColumnInvalidError("img.jpg: row 9 out of range"), Code.INVALID_ARGUMENT),
        (exc.DataLimitError("img.jpg: too many points"), Code.RESOURCE_EXHAUSTED),
        (exc.HashMismatchError("weights hash"), Code.FAILED_PRECONDITION),
        (exc.RowColumnMismatchError("(3, 4) not in f.fv"), Code.NOT_FOUND),
        (exc.TrainingLabelsError("one class"), Code.INVALID_ARGUMENT),
        (exc.StorageFileNotFoundError("/d/x.jpg: file not found"), Code.NOT_FOUND),
        (exc.StorageKeyError("No blob with key 'mem/key' in memory storage."), Code.NOT_FOUND),
        (exc.StorageUnavailableError("s3://b/k: S3 endpoint unreachable"), Code.UNAVAILABLE),
        (exc.QueueFullError("full"), Code.RESOURCE_EXHAUSTED),
        (exc.AccessDeniedError("'/etc/x' is outside the allowed data roots"), Code.PERMISSION_DENIED),
        (exc.URLDownloadError("http://h/x.jpg", TimeoutError("slow")), Code.UNAVAILABLE),
        (
            exc.URLRefusedError("http://10.0.0.1/x.jpg refused", PermissionError("private")),
            Code.PERMISSION_DENIED,
        ),
        (exc.UnsafePickleError("clf.pkl: refused to load classifier"), Code.INVALID_ARGUMENT),
        (crop.ImageDecodeError("not an image"), Code.INVALID_ARGUMENT),
    ],
)
def test_status_for_known_errors(error, code):
    got, message = errors.describe(error, "tok")
    assert got == code
    assert message.startswith("tok: ")


@pytest.mark.parametrize(
    "error",
    [
        KeyError("mem/key"),
        ValueError("a library bug"),
        FileNotFoundError(2, "No such file", "/d/x.jpg"),
        ConnectionRefusedError("refused"),
        crop.InternalCropError("internal error in crop_rs: index out of bounds"),
    ],
)
def test_builtin_and_internal_errors_are_internal_not_the_clients_fault(error):
    assert errors.status_for(error) is None
    code, message = errors.describe(error, "tok")
    assert code == Code.INTERNAL and "ref " in message


def test_boto_errors_are_wrapped_by_storage_and_map_by_http_status():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from spacer_core.data_classes import DataLocation
    from spacer_core.storage import _raise_boto_error

    loc = DataLocation("s3", "k.jpg", "b")

    def mapped(error):
        with pytest.raises(exc.SpacerError) as raised:
            _raise_boto_error(loc, error)
        assert "s3://b/k.jpg" in str(raised.value)
        return errors.status_for(raised.value)[0]

    def client_error(code, status):
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "GetObject",
        )

    assert mapped(client_error("NoSuchKey", 404)) == Code.NOT_FOUND
    assert mapped(client_error("AccessDenied", 403)) == Code.PERMISSION_DENIED
    assert mapped(client_error("InternalError", 503)) == Code.UNAVAILABLE
    assert mapped(client_error("InvalidBucketName", 400)) == Code.FAILED_PRECONDITION
    assert mapped(EndpointConnectionError(endpoint_url="http://x")) == Code.UNAVAILABLE


def test_unexpected_errors_are_internal_with_a_generic_message_and_a_logged_traceback(caplog):
    with caplog.at_level(logging.ERROR, logger="server.rpc"):
        code, message = errors.describe(RuntimeError("secret internals"), "tok")
    assert code == Code.INTERNAL
    assert "secret" not in message and "internal error" in message
    ref = message.split("ref ")[1].split(")")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


def test_storage_errors_without_a_file_name_list_the_request_locations():
    bare_404 = exc.StorageMissingObjectError("no such object (404)")
    code, message = errors.describe(
        bare_404, "", ["feature_loc=s3://b/f/a.fv", "classifier_loc=s3://b/m.pkl"]
    )
    assert code == Code.NOT_FOUND
    assert "feature_loc=s3://b/f/a.fv" in message and "classifier_loc=s3://b/m.pkl" in message
    many = [f"labels.train.images[{i}].feature_loc=/d/{i}.fv" for i in range(20)]
    _, message = errors.describe(bare_404, "", many)
    assert "and 14 more" in message and "/d/19.fv" not in message
    # An error about a location (storage names it in the message where it raises) is left alone.
    named = exc.StorageFileNotFoundError(
        "/d/3.fv: file not found", location=DataLocation("filesystem", "/d/3.fv")
    )
    _, message = errors.describe(named, "", many)
    assert message == "/d/3.fv: file not found"


# ---------------------------------------------------------------- errors carry their location


def test_storage_errors_carry_the_location_they_are_about(tmp_path):
    missing = DataLocation("filesystem", str(tmp_path / "gone.jpg"))
    with pytest.raises(exc.StorageFileNotFoundError) as raised:
        storage.load_bytes(missing)
    assert raised.value.location == missing and missing.key in str(raised.value)

    blob = DataLocation("memory", f"no/such/blob-{tmp_path.name}")
    with pytest.raises(exc.StorageKeyError) as raised:
        storage.load_bytes(blob)
    assert raised.value.location == blob and blob.key in str(raised.value)

    outside = DataLocation("filesystem", "/etc/passwd")
    with storage.policy_scope(storage.ClientPolicy([tmp_path])):
        for loc in (outside, DataLocation("memory", "k")):
            with pytest.raises(exc.AccessDeniedError) as raised:
                storage.load_bytes(loc)
            assert raised.value.location == loc and loc.key in str(raised.value)
    with storage.policy_scope(storage.ClientPolicy([tmp_path], s3_buckets=["b"])):
        with pytest.raises(exc.AccessDeniedError) as raised:
            storage.check_access(DataLocation("s3", "k.jpg", "other"), "read")
        assert raised.value.location == DataLocation("s3", "k.jpg", "other")

    with pytest.raises(exc.InvalidInputError) as raised:
        storage.load_bytes(DataLocation("filesystem", "a\0b"))
    assert raised.value.location == DataLocation("filesystem", "a\0b")


def test_boto_errors_carry_their_location():
    from botocore.exceptions import ClientError

    loc = DataLocation("s3", "k.jpg", "b")
    error = ClientError(
        {"Error": {"Code": "NoSuchKey", "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
        "GetObject",
    )
    with pytest.raises(exc.StorageMissingObjectError) as raised:
        storage._raise_boto_error(loc, error)
    assert raised.value.location == loc


def test_url_errors_carry_the_url_asked_for():
    with pytest.raises(exc.URLRefusedError) as raised:
        urlfetch.fetch("file:///etc/passwd")
    assert raised.value.location == "file:///etc/passwd"
    with pytest.raises(exc.URLDownloadError) as raised:
        urlfetch.fetch("no-scheme-here")
    assert raised.value.location == "no-scheme-here"
    # Through storage the error is about the DataLocation itself.
    loc = DataLocation("url", "file:///etc/passwd")
    with pytest.raises(exc.URLRefusedError) as raised:
        storage.load_bytes(loc)
    assert raised.value.location == loc


def test_undecodable_stored_image_carries_its_location():
    loc = DataLocation("memory", "errors-test/not-an-image.jpg")
    storage.store_bytes(loc, b"not an image")
    try:
        with pytest.raises(exc.ImageError) as raised:
            storage.load_image(loc)
    finally:
        storage.delete_data(loc)
    assert raised.value.location == loc and loc.key in str(raised.value)


def _pb_loc(key: str, storage_type: str = "filesystem", bucket: str = "") -> pb.DataLocation:
    return pb.DataLocation(storage_type=storage_type, key=key, bucket_name=bucket)


def test_request_locations_are_the_locations_jobs_are_built_from():
    from server import convert

    request = pb.ClassifyImageRequest(
        job_token="t",
        image_loc=_pb_loc("img.jpg", "s3", "b"),
        classifier_loc=_pb_loc("/d/clf.pkl"),
        extractor=pb.Extractor(class_path="x", data_locations={"weights": _pb_loc("w.pt", "memory")}),
    )
    found = {entry.field: entry for entry in errors.request_locations(request)}
    assert set(found) == {"image_loc", "classifier_loc", "extractor.data_locations[weights]"}
    for name in ("image_loc", "classifier_loc"):
        assert found[name].location == convert.location(getattr(request, name), name)
    assert str(found["image_loc"]) == "image_loc=s3://b/img.jpg"
    assert str(found["extractor.data_locations[weights]"]) == "extractor.data_locations[weights]=memory:w.pt"
    # A storage type the library lacks has no location to match, only its text.
    odd = errors.request_locations(pb.ClassifyImageRequest(image_loc=_pb_loc("x", "ftp")))
    assert [(e.field, e.location, e.text) for e in odd] == [("image_loc", None, "x")]


def test_a_refusal_names_the_field_of_its_location_even_when_the_text_names_another(tmp_path):
    # The image key is part of the refused classifier path: the message names
    # both, and only the error's location says which field was refused.
    request = pb.ClassifyImageRequest(
        job_token="tok",
        image_loc=_pb_loc("clf.pkl"),
        classifier_loc=_pb_loc("/elsewhere/clf.pkl"),
    )
    locations = errors.request_locations(request)
    with storage.policy_scope(storage.ClientPolicy([tmp_path])):
        with pytest.raises(exc.AccessDeniedError) as raised:
            storage.load_bytes(DataLocation("filesystem", "/elsewhere/clf.pkl"))
    code, message = errors.describe(raised.value, "tok", locations)
    assert code == Code.PERMISSION_DENIED
    assert message == f"tok: classifier_loc: {raised.value}"
    assert "image_loc" not in message and "request locations" not in message


def test_a_refusal_about_no_request_field_is_not_given_one():
    request = pb.ClassifyImageRequest(image_loc=_pb_loc("a.jpg"), classifier_loc=_pb_loc("b.pkl"))
    refused = exc.AccessDeniedError("'a.jpg/b.pkl' is outside", location=DataLocation("filesystem", "c"))
    code, message = errors.describe(refused, "", errors.request_locations(request))
    assert code == Code.PERMISSION_DENIED and message == "'a.jpg/b.pkl' is outside"


def test_only_storage_errors_about_no_location_list_the_request_locations():
    locations = errors.request_locations(
        pb.ClassifyImageRequest(image_loc=_pb_loc("a.jpg"), classifier_loc=_pb_loc("b.pkl"))
    )
    _, message = errors.describe(exc.StorageUnavailableError("S3 endpoint unreachable"), "", locations)
    assert message.endswith("(request locations: image_loc=a.jpg, classifier_loc=b.pkl)")
    located = exc.StorageUnavailableError("a.jpg: unreachable", location=DataLocation("filesystem", "a.jpg"))
    assert errors.describe(located, "", locations)[1] == "a.jpg: unreachable"
    # Not a storage error: its message says what it is about.
    dims = exc.FeatureDimensionError("a.jpg: features have 1280 dimensions, the classifier 64")
    assert errors.describe(dims, "", locations)[1] == str(dims)


def test_the_token_prefixes_every_message_once():
    code, message = errors.describe(exc.ImageError("image_bytes: cannot identify image"), "tok-1")
    assert message == "tok-1: image_bytes: cannot identify image"
    # The prefix is the RPC's, whatever the library's message says.
    _, message = errors.describe(exc.ImageError("tok-1: something"), "tok-1")
    assert message == "tok-1: tok-1: something"


def test_one_log_line_per_rpc_with_method_status_duration_and_token(client, data, caplog):
    with caplog.at_level(logging.INFO, logger="server.rpc"):
        rpc_error(
            client.classify_image,
            data["extractor"],
            [(999, 1)],
            fs(data["image"]),
            fs(data["clf"]),
            job_token="log-1",
        )
        client.list_models()
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if r.name == "server.rpc"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.rpc"]
    assert len(lines) == 2
    assert lines[0].startswith("rpc method=ClassifyImage status=INVALID_ARGUMENT duration_ms=")
    assert 'token="log-1"' in lines[0] and "small.png" in lines[0]
    assert lines[1].startswith("rpc method=ListModels status=OK duration_ms=")
