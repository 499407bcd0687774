"""spacer_core.storage against real disks, a loopback HTTP server, moto's S3 server, and pyspacer."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import spacer.data_classes
import spacer.storage
from PIL import Image
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import SGDClassifier

from spacer_core import storage
from spacer_core.data_classes import DataLocation, ImageFeatures
from spacer_core.exceptions import URLDownloadError
from spacer_core.runtime import Runtime
from spacer_core.storage import (
    FileSystemStorage,
    MemoryStorage,
    S3Storage,
    URLStorage,
    clear_memory_storage,
    load_classifier,
    load_image,
    storage_factory,
    store_classifier,
    store_image,
)
from spacer_core.testing import calibrated_classifier
from spacer_core.urlfetch import UrlRules

LEGACY_DIR = Path(__file__).parents[1] / "fixtures" / "legacy_classifiers"
LEGACY_PICKLES = sorted(LEGACY_DIR.glob("*.pkl"))


@pytest.fixture(autouse=True)
def _isolated_caches():
    clear_memory_storage()
    load_classifier.cache_clear()
    yield
    clear_memory_storage()
    load_classifier.cache_clear()


# --- factory ---------------------------------------------------------------


def test_factory_types():
    assert isinstance(storage_factory("filesystem"), FileSystemStorage)
    assert isinstance(storage_factory("url"), URLStorage)
    s3 = storage_factory("s3", "bucket-a")
    assert isinstance(s3, S3Storage) and s3.bucket_name == "bucket-a"
    # One memory store per process.
    assert storage_factory("memory") is storage_factory("memory")
    with pytest.raises(ValueError, match="bucket_name must be a string"):
        storage_factory("s3")
    with pytest.raises(ValueError, match="Unknown storage type 'ftp'"):
        storage_factory("ftp")


# --- filesystem -------------------------------------------------------------


def test_filesystem_creates_parents_and_round_trips(tmp_path):
    fs = FileSystemStorage()
    key = str(tmp_path / "a" / "b" / "c.bin")
    assert not fs.exists(key)
    fs.store(key, BytesIO(b"hello"))
    assert fs.exists(key)
    assert fs.load(key).getvalue() == b"hello"
    fs.store(key, b"bytes too")
    assert Path(key).read_bytes() == b"bytes too"
    with open(tmp_path / "src", "wb+") as f:
        f.write(b"from a file object")
        fs.store(key, f)
    assert fs.load(key).getvalue() == b"from a file object"
    fs.delete(key)
    assert not fs.exists(key)


def test_filesystem_file_mode_is_as_open_gives(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    FileSystemStorage().store(str(tmp_path / "m.bin"), b"x")
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"x")
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_filesystem_store_relative_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FileSystemStorage().store("rel/x.txt", b"r")
    assert (tmp_path / "rel" / "x.txt").read_bytes() == b"r"


def test_filesystem_write_is_atomic(tmp_path, monkeypatch):
    fs = FileSystemStorage()
    key = tmp_path / "out.bin"
    fs.store(str(key), b"old content")

    def failing_replace(src, dst, **dir_fds):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        fs.store(str(key), b"new content that never lands")
    # The old file is intact and no temporary file is left behind.
    assert key.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_filesystem_missing_file():
    with pytest.raises(FileNotFoundError):
        FileSystemStorage().load("/nonexistent/dir/file.bin")


# --- memory -----------------------------------------------------------------


def test_memory_round_trip_and_missing_key():
    mem = storage_factory("memory")
    mem.store("k", BytesIO(b"v"))
    assert mem.exists("k")
    assert mem.load("k").getvalue() == b"v"
    mem.delete("k")
    assert not mem.exists("k")
    with pytest.raises(KeyError, match="'absent/key.bin'"):
        mem.load("absent/key.bin")
    with pytest.raises(KeyError, match="'absent/key.bin'"):
        mem.delete("absent/key.bin")


def test_memory_store_copies_the_stream():
    mem = MemoryStorage()
    stream = BytesIO(b"first")
    mem.store("k", stream)
    stream.write(b"XXXXX")
    assert mem.load("k").getvalue() == b"first"


def test_clear_memory_storage():
    storage_factory("memory").store("k", b"v")
    clear_memory_storage()
    assert not storage_factory("memory").exists("k")


# --- url --------------------------------------------------------------------


def test_url_load_and_exists(http_server):
    url = http_server.add("/images/a.jpg", b"jpeg bytes")
    store = storage_factory("url")
    assert store.load(url).getvalue() == b"jpeg bytes"
    assert store.exists(url)
    assert not store.exists(http_server.url("/missing"))
    assert not store.exists("not a url")


def test_url_404_names_the_url(http_server):
    url = http_server.url("/nothing/here.jpg")
    with pytest.raises(URLDownloadError) as info:
        URLStorage().load(url)
    assert f"Failed to download from the URL '{url}'" in str(info.value)
    assert "HTTPError" in str(info.value) and "404" in str(info.value)
    assert info.value.original_error.code == 404


def test_url_malformed_and_unreachable():
    with pytest.raises(URLDownloadError, match="Failed to download from the URL 'no-scheme'"):
        URLStorage().load("no-scheme")
    # Nothing listens on port 9 (discard) of the loopback interface here.
    with pytest.raises(
        URLDownloadError, match="Failed to download from the URL 'http://127.0.0.1:9/x'"
    ) as info:
        URLStorage(UrlRules(allow_private=True)).load("http://127.0.0.1:9/x")
    assert isinstance(info.value.original_error, ConnectionRefusedError)


def test_url_timeout(http_server, monkeypatch):
    monkeypatch.setattr(URLStorage, "TIMEOUT", 0.3)
    url = http_server.add("/slow.jpg", b"late", delay=2.0)
    with pytest.raises(URLDownloadError, match="slow.jpg") as info:
        URLStorage().load(url)
    assert isinstance(info.value.original_error, (TimeoutError, OSError))


def test_url_stall_mid_body(http_server, monkeypatch):
    monkeypatch.setattr(URLStorage, "TIMEOUT", 0.3)
    url = http_server.add("/stall.bin", b"x" * 1000, stall=2.0)
    with pytest.raises(
        URLDownloadError, match="Couldn't read the full response from the URL '.*stall.bin'"
    ) as info:
        URLStorage().load(url)
    assert isinstance(info.value.original_error, TimeoutError)


def test_url_default_timeout_is_20_seconds():
    assert URLStorage.TIMEOUT == 20.0


def test_url_incomplete_body(http_server):
    url = http_server.add("/cut.bin", b"abc", claim_length=100)
    with pytest.raises(URLDownloadError, match="Couldn't read the full response from the URL '.*cut.bin'"):
        URLStorage().load(url)


def test_url_is_read_only(http_server):
    url = http_server.add("/a", b"a")
    with pytest.raises(TypeError, match="Store operation not supported for URL storage"):
        URLStorage().store(url, BytesIO(b"x"))
    with pytest.raises(TypeError, match="Delete operation not supported"):
        URLStorage().delete(url)


def test_url_filesystem_cache(http_server, tmp_path):
    url = http_server.add("/feats/one.featurevector", b"payload")
    store = URLStorage()
    assert store.load(url, str(tmp_path)).getvalue() == b"payload"
    assert store.load(url, str(tmp_path)).getvalue() == b"payload"
    # The second load came from the cache.
    assert http_server.hits["/feats/one.featurevector"] == 1
    cached = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in cached] == [b"payload"]


# --- s3 (moto server) ---------------------------------------------------------


def test_s3_round_trip(s3_bucket):
    store = storage_factory("s3", s3_bucket)
    assert not store.exists("a/b.bin")
    store.store("a/b.bin", BytesIO(b"s3 payload"))
    assert store.exists("a/b.bin")
    assert store.load("a/b.bin").getvalue() == b"s3 payload"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")


def test_s3_load_missing_propagates(s3_bucket):
    import botocore.exceptions

    with pytest.raises(botocore.exceptions.ClientError):
        storage_factory("s3", s3_bucket).load("missing.bin")


def test_s3_filesystem_cache(s3_bucket, tmp_path):
    store = storage_factory("s3", s3_bucket)
    store.store("f/x.bin", b"v1")
    assert store.load("f/x.bin", str(tmp_path)).getvalue() == b"v1"
    store.store("f/x.bin", b"v2")
    # Served from the cache, not S3.
    assert store.load("f/x.bin", str(tmp_path)).getvalue() == b"v1"
    assert (tmp_path / "f" / "x.bin").read_bytes() == b"v1"


def test_s3_exists_propagates_errors_other_than_404(http_server, monkeypatch):
    import botocore.exceptions

    # A loopback server that refuses every object with 403, as S3 does when
    # the caller lacks ListBucket permission.
    http_server.add("/bucket-x/key.bin", b"", status=403)
    _point_s3_at(monkeypatch, http_server.base_url, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        S3Storage("bucket-x").exists("key.bin")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def _point_s3_at(monkeypatch, endpoint: str, **settings) -> None:
    from spacer_core import config

    base = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE_NAME": None,
        "AWS_REGION": "us-east-1",
        "AWS_ANONYMOUS": False,
    }
    base.update(settings)
    for name, value in base.items():
        monkeypatch.setattr(config, name, value)


def _auth_header(http_server) -> str | None:
    method, path, headers = http_server.requests[-1]
    assert (method, path) == ("GET", "/bkt/obj.bin")
    return {k.lower(): v for k, v in headers.items()}.get("authorization")


def test_s3_signs_with_configured_keys(http_server, monkeypatch):
    http_server.add("/bkt/obj.bin", b"signed")
    _point_s3_at(
        monkeypatch, http_server.base_url, AWS_ACCESS_KEY_ID="AKIDCONFIGURED", AWS_SECRET_ACCESS_KEY="s"
    )
    assert S3Storage("bkt").load("obj.bin").getvalue() == b"signed"
    assert "Credential=AKIDCONFIGURED/" in _auth_header(http_server)


def test_s3_anonymous_sends_no_signature(http_server, monkeypatch):
    http_server.add("/bkt/obj.bin", b"public")
    _point_s3_at(
        monkeypatch,
        http_server.base_url,
        AWS_ANONYMOUS=True,
        AWS_ACCESS_KEY_ID="AKIDIGNORED",
        AWS_SECRET_ACCESS_KEY="s",
    )
    assert S3Storage("bkt").load("obj.bin").getvalue() == b"public"
    assert _auth_header(http_server) is None


def test_s3_uses_named_profile(http_server, monkeypatch, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.write_text("[survey]\naws_access_key_id = AKIDFROMPROFILE\naws_secret_access_key = p\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    http_server.add("/bkt/obj.bin", b"via profile")
    _point_s3_at(monkeypatch, http_server.base_url, AWS_PROFILE_NAME="survey")
    assert S3Storage("bkt").load("obj.bin").getvalue() == b"via profile"
    assert "Credential=AKIDFROMPROFILE/" in _auth_header(http_server)


def test_s3_features_readable_by_pyspacer_store(s3_bucket, moto_server, monkeypatch):
    """Feature files we put on S3 are what pyspacer reads from the same bucket."""
    import spacer.aws
    import spacer.config

    feats = ImageFeatures.from_arrays(
        np.random.default_rng(0).random((4, 6)), rows=[1, 2, 3, 4], cols=[5, 6, 7, 8]
    )
    feats.store(DataLocation("s3", "img.featurevector", bucket_name=s3_bucket))

    # pyspacer has no endpoint setting; give it a resource bound to moto.
    import boto3

    resource = boto3.resource(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing-access-key",
        aws_secret_access_key="testing-secret-key",
    )
    monkeypatch.setattr(spacer.aws.THREAD_LOCAL, "s3_resource", resource, raising=False)
    theirs = spacer.data_classes.ImageFeatures.load(
        spacer.data_classes.DataLocation("s3", "img.featurevector", bucket_name=s3_bucket)
    )
    assert np.array_equal(theirs.get_array((3, 7)), feats.get_array((3, 7)))


# --- images -------------------------------------------------------------------


def test_image_round_trip(tmp_path):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    loc = DataLocation("filesystem", str(tmp_path / "im.jpg"))
    store_image(loc, img)
    loaded = load_image(loc)
    assert loaded.format == "JPEG" and loaded.size == (40, 30)


def test_truncated_image_loads(tmp_path):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    buf = BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    storage_factory("memory").store("cut.jpg", data[: len(data) * 2 // 3])
    loaded = load_image(DataLocation("memory", "cut.jpg"))
    loaded.load()
    assert loaded.size == (300, 200)


# --- classifiers --------------------------------------------------------------


def _probe(dim: int = 8) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(5, dim))


@pytest.mark.parametrize("clf_type", ["LR", "MLP"])
def test_classifier_round_trip_and_pyspacer_reads_it(tmp_path, clf_type):
    clf = calibrated_classifier(clf_type, feature_dim=8, classes=(0, 1, 2))
    path = str(tmp_path / "m" / "clf.pkl")
    store_classifier(DataLocation("filesystem", path), clf)
    assert Path(path).read_bytes()[:2] == b"\x80\x02"  # pickle protocol 2
    ours = load_classifier(DataLocation("filesystem", path))
    theirs = spacer.storage.load_classifier(spacer.data_classes.DataLocation("filesystem", path))
    np.testing.assert_array_equal(ours.predict_proba(_probe()), clf.predict_proba(_probe()))
    np.testing.assert_array_equal(theirs.predict_proba(_probe()), clf.predict_proba(_probe()))


def test_we_read_pyspacer_classifier():
    clf = calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=3)
    spacer.storage.store_classifier(spacer.data_classes.DataLocation("memory", "p.pkl"), clf)
    raw = spacer.storage.storage_factory("memory").load("p.pkl").getvalue()
    storage_factory("memory").store("p.pkl", raw)
    ours = load_classifier(DataLocation("memory", "p.pkl"))
    np.testing.assert_array_equal(ours.predict_proba(_probe()), clf.predict_proba(_probe()))


def test_store_unfitted_classifier_is_refused():
    with pytest.raises(ValueError, match="Only fitted classifiers can be stored"):
        store_classifier(DataLocation("memory", "x"), CalibratedClassifierCV(SGDClassifier(), cv="prefit"))


def test_classifier_cache_sees_overwritten_file(tmp_path):
    load_classifier = Runtime().classifier
    loc = DataLocation("filesystem", str(tmp_path / "clf.pkl"))
    first, second = (
        calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=1),
        calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=2),
    )
    store_classifier(loc, first)
    assert load_classifier(loc) is load_classifier(loc)
    # Written by another process (not through store_classifier): the file's
    # new size/mtime must invalidate the cached model.
    data = pickle.dumps(second, protocol=2)
    Path(loc.key).write_bytes(data)
    os.utime(loc.key, ns=(1, 1))
    np.testing.assert_array_equal(
        load_classifier(loc).predict_proba(_probe()), second.predict_proba(_probe())
    )


def test_classifier_cache_sees_replaced_memory_blob():
    load_classifier = Runtime().classifier
    loc = DataLocation("memory", "clf.pkl")
    first, second = (
        calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=1),
        calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=2),
    )
    storage_factory("memory").store(loc.key, pickle.dumps(first, protocol=2))
    a = load_classifier(loc)
    storage_factory("memory").store(loc.key, pickle.dumps(second, protocol=2))
    b = load_classifier(loc)
    assert a is not b
    np.testing.assert_array_equal(b.predict_proba(_probe()), second.predict_proba(_probe()))


def test_concurrent_classifier_loads_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    locs = [DataLocation("filesystem", str(tmp_path / f"c{i}.pkl")) for i in range(4)]
    models = [calibrated_classifier(feature_dim=8, classes=(0, 1, 2), seed=i) for i in range(4)]
    for loc, model in zip(locs, models):
        store_classifier(loc, model)
    expected = [m.predict_proba(_probe()) for m in models]

    def score(i: int) -> np.ndarray:
        # More locations than cache slots, so entries are evicted while read.
        return load_classifier(locs[i % 4]).predict_proba(_probe())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(score, range(64)))
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, expected[i % 4])


def test_load_rejects_other_objects():
    storage_factory("memory").store("svc.pkl", pickle.dumps(SGDClassifier(), protocol=2))
    with pytest.raises(
        ValueError, match="svc.pkl: Loaded a SGDClassifier instead of a CalibratedClassifierCV"
    ):
        load_classifier(DataLocation("memory", "svc.pkl"))
    storage_factory("memory").store(
        "cv.pkl", pickle.dumps(CalibratedClassifierCV(SGDClassifier(), cv=3), protocol=2)
    )
    with pytest.raises(ValueError, match="cv.pkl: Loaded classifier has cv '3' instead of 'prefit'"):
        load_classifier(DataLocation("memory", "cv.pkl"))
    storage_factory("memory").store("junk.pkl", b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.pkl: cannot load classifier"):
        load_classifier(DataLocation("memory", "junk.pkl"))


def test_legacy_fixtures_present():
    versions = {p.name.split("-")[1] for p in LEGACY_PICKLES}
    assert versions == {"0.17.1", "0.22.1", "1.1.3"}


@pytest.mark.parametrize("pkl", LEGACY_PICKLES, ids=[p.stem for p in LEGACY_PICKLES])
def test_legacy_classifier_scores_as_when_pickled(pkl):
    """Pickles made by the old releases themselves (see tests/fixtures/make_legacy_classifiers.py)."""
    meta = json.loads(pkl.with_suffix(".json").read_text())
    clf = load_classifier(DataLocation("filesystem", str(pkl)))
    probe = np.array(meta["probe"])
    np.testing.assert_allclose(clf.predict_proba(probe), np.array(meta["proba"]), rtol=0, atol=1e-12)
    assert clf.classes_.tolist() == meta["classes"]
    # Repaired to the current attribute layout.
    assert hasattr(clf, "estimator") and "base_estimator" not in clf.__dict__
    for calibrated in clf.calibrated_classifiers_:
        assert hasattr(calibrated, "estimator") and hasattr(calibrated, "calibrators")
        assert calibrated.classes is not None
    if meta["clf_type"] == "LR":
        assert clf.estimator.loss == "log_loss"


@pytest.mark.parametrize("pkl", LEGACY_PICKLES, ids=[p.stem for p in LEGACY_PICKLES])
def test_legacy_classifier_matches_pyspacer_loader(pkl):
    meta = json.loads(pkl.with_suffix(".json").read_text())
    ours = load_classifier(DataLocation("filesystem", str(pkl)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = spacer.storage.load_classifier(spacer.data_classes.DataLocation("filesystem", str(pkl)))
    probe = np.array(meta["probe"])
    np.testing.assert_array_equal(ours.predict_proba(probe), theirs.predict_proba(probe))


def test_legacy_pickle_from_python2_uses_old_module_paths():
    # Guards the fixture itself: the 0.17.1 pickle must exercise the renames.
    raw = (LEGACY_DIR / "sklearn-0.17.1-LR.pkl").read_bytes()
    assert b"sklearn.linear_model.stochastic_gradient" in raw
    assert b"sklearn.linear_model.sgd_fast" in raw
    assert b"base_estimator" in raw


# --- aws helpers and names ------------------------------------------------------


def test_aws_check_reports_presence_not_values(s3_bucket, capsys):
    from spacer_core.aws import aws_check

    aws_check()
    out = capsys.readouterr().out
    assert "Spacer config - AWS_ACCESS_KEY_ID: Yes" in out
    assert "Spacer config - AWS_SESSION_TOKEN: No" in out
    assert "testing-secret-key" not in out
    assert "Identified as ARN: arn:aws:" in out


def test_s3_resource_follows_settings(s3_bucket, monkeypatch):
    from spacer_core import config
    from spacer_core.aws import get_s3_resource

    first = get_s3_resource()
    assert get_s3_resource() is first
    monkeypatch.setattr(config, "AWS_REGION", "eu-west-1")
    assert get_s3_resource() is not first
    assert get_s3_resource().meta.client.meta.region_name == "eu-west-1"


def _defined_in_spacer(value) -> bool:
    """False for modules and for what pyspacer merely imported from other packages."""
    import types

    try:
        if isinstance(value, types.ModuleType):
            return False
        module = getattr(value, "__module__", "spacer.")
    except Exception:  # lazy objects, such as Django's unconfigured settings, raise here
        return False
    return isinstance(module, str) and module.startswith("spacer")


@pytest.mark.parametrize("module", ["config", "data_classes", "messages", "storage", "aws"])
def test_public_names_cover_pyspacers(module):
    import importlib

    theirs = importlib.import_module(f"spacer.{module}")
    ours = importlib.import_module(f"spacer_core.{module}")
    names = {
        name for name, value in vars(theirs).items() if not name.startswith("_") and _defined_in_spacer(value)
    }
    assert sorted(n for n in names if not hasattr(ours, n)) == []


# ---------------------------------------------------------------- client policy and cache keys


def test_cache_path_stays_inside_the_cache_folder(tmp_path):
    from spacer_core.exceptions import AccessDeniedError

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "out").symlink_to(tmp_path, target_is_directory=True)
    assert storage.cache_path_for(cache, "a/b.fv") == str(cache.resolve() / "a/b.fv")
    # pyspacer's layout for URL keys: the scheme's '//' collapses.
    assert storage.cache_path_for(cache, "http://h/x.fv") == str(cache.resolve() / "http:/h/x.fv")
    for key in ("../x.fv", "a/../../x.fv", "/etc/passwd", "http://h/../../../x.fv", "out/x.fv", "."):
        with pytest.raises(AccessDeniedError, match="outside the local cache folder"):
            storage.cache_path_for(cache, key)


def test_client_policy_covers_every_storage_type(tmp_path):
    from spacer_core.exceptions import AccessDeniedError
    from spacer_core.urlfetch import UrlRules

    policy = storage.ClientPolicy([tmp_path], s3_buckets=["mine"], url_rules=UrlRules(allow_private=True))
    policy.check(DataLocation("filesystem", str(tmp_path / "a.jpg")), "read")
    policy.check(DataLocation("s3", "k", "mine"), "write")
    policy.check(DataLocation("url", "http://127.0.0.1/x"), "read")
    for loc in (
        DataLocation("filesystem", "/etc/passwd"),
        DataLocation("s3", "k", "theirs"),
        DataLocation("memory", "k"),
    ):
        with pytest.raises(AccessDeniedError):
            policy.check(loc, "read")
    storage.ClientPolicy(None).check(DataLocation("filesystem", "/etc/passwd"), "read")
    storage.ClientPolicy(None, allow_memory=True).check(DataLocation("memory", "k"), "read")
    assert "refused" in storage.ClientPolicy(None).describe()


def test_url_rules_apply_per_policy_not_per_process(tmp_path):
    """A policy's url rules reach url storage only where the policy is active."""
    from spacer_core.exceptions import URLRefusedError
    from spacer_core.urlfetch import UrlRules

    loc = DataLocation("url", "http://127.0.0.1:9/x.jpg")
    with storage.policy_scope(storage.ClientPolicy(None, url_rules=UrlRules(allow_private=True))):
        with pytest.raises(URLDownloadError) as err:  # allowed: it tried, and nothing listens on port 9
            storage.load_bytes(loc)
        assert not isinstance(err.value, URLRefusedError)
    with pytest.raises(URLRefusedError, match="loopback"):
        storage.load_bytes(loc)


# --- race-free opening under data roots ----------------------------------------------


def _swap_after_check(monkeypatch, folder: Path, outside: Path) -> None:
    """Make the next path resolution return, then turn `folder` into a symlink to `outside`."""
    real = os.path.realpath

    def resolve_then_swap(path, *args, **kwargs):
        resolved = real(path, *args, **kwargs)
        if folder.is_dir() and not folder.is_symlink():
            folder.rename(folder.with_name(folder.name + ".moved"))
            folder.symlink_to(outside)
        return resolved

    monkeypatch.setattr(storage.os.path, "realpath", resolve_then_swap)


@pytest.mark.parametrize("access", ["read", "write"])
def test_confined_storage_never_follows_a_symlink_swapped_in_after_the_check(tmp_path, monkeypatch, access):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "f.bin").write_bytes(b"inside")
    (outside / "f.bin").write_bytes(b"outside")
    confined = storage.ConfinedFileSystemStorage([root.resolve()])
    _swap_after_check(monkeypatch, root / "d", outside)
    with pytest.raises(storage.AccessDeniedError, match="outside the allowed data roots"):
        if access == "read":
            confined.load(str(root / "d" / "f.bin"))
        else:
            confined.store(str(root / "d" / "f.bin"), b"written")
    assert (outside / "f.bin").read_bytes() == b"outside"
    assert sorted(p.name for p in outside.iterdir()) == ["f.bin"]


def test_confined_storage_reads_writes_and_creates_folders_inside(tmp_path):
    root = tmp_path.resolve()
    (root / "real").mkdir()
    (root / "link").symlink_to(root / "real")  # a symlink inside the root that stays inside
    confined = storage.ConfinedFileSystemStorage([root])
    confined.store(str(root / "link" / "new" / "deeper" / "f.bin"), b"data")
    assert (root / "real" / "new" / "deeper" / "f.bin").read_bytes() == b"data"
    assert confined.load(str(root / "link" / "new" / "deeper" / "f.bin")).getvalue() == b"data"
    assert confined.exists(str(root / "real" / "new" / "deeper" / "f.bin"))
    confined.delete(str(root / "real" / "new" / "deeper" / "f.bin"))
    assert not confined.exists(str(root / "real" / "new" / "deeper" / "f.bin"))
    assert not [p for p in (root / "real" / "new" / "deeper").iterdir()]  # no temporary left


def test_confined_storage_refuses_a_fifo_without_blocking(tmp_path):
    root = tmp_path.resolve()
    os.mkfifo(root / "pipe")
    with pytest.raises(storage.InvalidInputError, match="not a regular file"):
        storage.ConfinedFileSystemStorage([root]).load(str(root / "pipe"))


def test_classifier_cache_takes_version_and_pickle_from_one_open_file(tmp_path):
    from spacer_core.runtime import Runtime

    root = tmp_path.resolve()
    first, second = root / "a.pkl", root / "b.pkl"
    for path, classes in ((first, [1, 2]), (second, [3, 4])):
        x = np.random.default_rng(0).normal(size=(20, 4))
        y = np.array(classes * 10)
        clf = CalibratedClassifierCV(SGDClassifier(loss="log_loss").fit(x, y), cv="prefit").fit(x, y)
        path.write_bytes(pickle.dumps(clf, protocol=2))
    link = root / "clf.pkl"
    link.symlink_to(first)
    runtime = Runtime(policy=storage.ClientPolicy([root]))
    loc = DataLocation("filesystem", str(link))
    with runtime.activate():
        assert runtime.classifier(loc).classes_.tolist() == [1, 2]
        link.unlink()
        link.symlink_to(second)
        assert runtime.classifier(loc).classes_.tolist() == [3, 4]
