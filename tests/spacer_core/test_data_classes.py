"""spacer_core.data_classes, with pyspacer 0.14.0 as the oracle for formats and behaviour."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import spacer.data_classes as ps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spacer_core.data_classes import (
    DataLocation,
    ImageFeatures,
    ImageLabels,
    InvalidDataError,
    PointFeatures,
    ValResults,
)
from spacer_core.exceptions import RowColumnMismatchError, RowColumnMissingError
from spacer_core.storage import clear_memory_storage, storage_factory


@pytest.fixture(autouse=True)
def _clean_memory():
    clear_memory_storage()
    yield
    clear_memory_storage()


def _ps_loc(loc: DataLocation) -> ps.DataLocation:
    return ps.DataLocation(loc.storage_type, loc.key, loc.bucket_name)


# --- DataLocation ---------------------------------------------------------------


def test_location_validation():
    with pytest.raises(InvalidDataError, match="Storage type not valid: 'ftp'"):
        DataLocation("ftp", "x")
    with pytest.raises(AssertionError, match="Need bucket_name to use s3"):
        DataLocation("s3", "x")
    with pytest.raises(InvalidDataError, match=r"Unknown DataLocation fields \['bucket'\]"):
        DataLocation.deserialize({"storage_type": "s3", "key": "k", "bucket": "b"})


@pytest.mark.parametrize(
    ("storage_type", "key", "bucket"),
    [
        ("filesystem", "/data/images/im1.jpg", None),
        ("memory", "feats/im1.featurevector", None),
        ("s3", "media/x/im1.png", "my-bucket"),
        ("url", "https://example.org/a/b/im1.jpg?sig=abc&x=1#frag", None),
        ("url", "https://example.org/", None),
    ],
)
def test_location_properties_match_pyspacer(storage_type, key, bucket):
    ours = DataLocation(storage_type, key, bucket)
    theirs = ps.DataLocation(storage_type, key, bucket)
    assert ours.filename == theirs.filename
    assert ours.is_remote == theirs.is_remote
    assert ours.is_writable == theirs.is_writable
    assert ours.serialize() == theirs.serialize()
    assert DataLocation.deserialize(theirs.serialize()) == ours


def test_location_is_a_dict_key():
    a, b = DataLocation("s3", "k", "b1"), DataLocation("s3", "k", "b1")
    c = DataLocation("s3", "k", "b2")
    assert a == b and hash(a) == hash(b) and a != c
    assert {a: 1, c: 2}[b] == 1
    assert DataLocation("memory", "x") != "x"


def test_location_store_load_json(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "loc.json"))
    DataLocation("url", "https://h/x.jpg").store(loc)
    assert DataLocation.load(loc) == DataLocation("url", "https://h/x.jpg")
    assert ps.DataLocation.load(_ps_loc(loc)) == ps.DataLocation("url", "https://h/x.jpg")


def test_load_non_json_names_the_key():
    storage_factory("memory").store("bad.json", b"\x89PNG")
    with pytest.raises(ValueError, match="bad.json: not a JSON ValResults"):
        ValResults.load(DataLocation("memory", "bad.json"))


# --- ImageLabels -----------------------------------------------------------------


def _labels_data() -> dict:
    return {
        DataLocation("filesystem", "/f/img1.fv"): [(10, 20, 1), (11, 21, 2), (12, 22, 1)],
        DataLocation("s3", "img2.fv", "bkt"): [(1, 2, "coral"), (3, 4, 1)],
        DataLocation("memory", "img3.fv"): [(5, 5, 2)],
    }


def test_image_labels_json_is_pyspacers():
    ours = ImageLabels(_labels_data())
    theirs = ps.ImageLabels({_ps_loc(k): v for k, v in _labels_data().items()})
    assert json.dumps(ours.serialize()) == json.dumps(theirs.serialize())
    back = ImageLabels.deserialize(json.loads(json.dumps(theirs.serialize())))
    assert back == ours
    assert back[DataLocation("s3", "img2.fv", "bkt")] == [(1, 2, "coral"), (3, 4, 1)]
    again = ps.ImageLabels.deserialize(json.loads(json.dumps(ours.serialize())))
    assert again.serialize() == theirs.serialize()


def test_image_labels_counts():
    labels = ImageLabels(_labels_data())
    assert len(labels) == 3
    assert labels.label_count == 6
    assert labels.classes_set == {1, 2, "coral"}
    assert labels.label_count_per_class[1] == 3
    assert labels.has_remote_data
    assert not ImageLabels({DataLocation("memory", "a"): [(1, 1, 1)]}).has_remote_data
    # Replacing an image's annotations replaces its counts.
    labels.add_image(DataLocation("memory", "img3.fv"), [(5, 5, 7), (6, 6, 7)])
    assert labels.label_count == 7
    assert labels.classes_set == {1, 2, "coral", 7}
    assert DataLocation("memory", "img3.fv") in labels


def test_image_labels_filter_classes():
    filtered = ImageLabels(_labels_data()).filter_classes([1])
    assert list(filtered.keys()) == [
        DataLocation("filesystem", "/f/img1.fv"),
        DataLocation("s3", "img2.fv", "bkt"),
    ]
    assert filtered[DataLocation("filesystem", "/f/img1.fv")] == [(10, 20, 1), (12, 22, 1)]
    assert filtered.label_count == 3


def test_image_labels_legacy_050_form():
    legacy = {"data": {"img1.features": [[100, 200, 3], [101, 200, 2]], "img2.features": [[1, 2, 3]]}}
    labels = ImageLabels.deserialize(legacy, features_loc=DataLocation("s3", "", "coralnet"))
    assert labels[DataLocation("s3", "img1.features", "coralnet")] == [(100, 200, 3), (101, 200, 2)]
    assert labels.has_remote_data
    default = ImageLabels.deserialize(legacy)
    assert DataLocation("filesystem", "img2.features") in default


def test_image_labels_bad_input_is_named():
    with pytest.raises(InvalidDataError, match="'not json' is not a serialized DataLocation"):
        ImageLabels.deserialize({"not json": [[1, 2, 3]]})
    key = json.dumps(DataLocation("memory", "m").serialize())
    with pytest.raises(InvalidDataError, match=r"annotation \[1, 2\] is not \[row, col, label\]"):
        ImageLabels.deserialize({key: [[1, 2]]})
    with pytest.raises(InvalidDataError, match="keys must be DataLocations"):
        ImageLabels({7: [(1, 2, 3)]})  # type: ignore[dict-item]
    # pyspacer 0.5.0's bare feature keys are accepted, resolved later against features_loc.
    bare = ImageLabels({"img.fv": [(1, 2, 3)]})  # type: ignore[dict-item]
    assert list(bare.resolve_keys(DataLocation("memory", "")).keys()) == [DataLocation("memory", "img.fv")]


def _store_both(loc: DataLocation, rows, cols, feat) -> None:
    ImageFeatures.from_arrays(feat, rows, cols).store(loc)


def _training_set(tmp_path: Path, n_images: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = {}
    for i in range(n_images):
        n = int(rng.integers(3, 9))
        rows = rng.choice(500, n, replace=False)
        cols = rng.choice(500, n, replace=False)
        loc = DataLocation("filesystem", str(tmp_path / f"img{i}.fv"))
        _store_both(loc, rows, cols, rng.random((n, 5)))
        # Annotate a shuffled subset, with one label type mix.
        keep = rng.permutation(n)[: n - 1]
        data[loc] = [(int(rows[j]), int(cols[j]), int(rng.integers(0, 3)) if j % 2 else "sand") for j in keep]
    return data


@pytest.mark.parametrize(("batch_size", "seed"), [(4, None), (5, 3), (1000, 0), (None, 2)])
def test_load_data_in_batches_matches_pyspacer(tmp_path, batch_size, seed):
    data = _training_set(tmp_path)
    ours = ImageLabels(data)
    theirs = ps.ImageLabels({_ps_loc(k): v for k, v in data.items()})
    ours_batches = [
        tuple(map(list, b)) for b in ours.load_data_in_batches(batch_size=batch_size, random_seed=seed)
    ]
    their_batches = [
        tuple(map(list, b)) for b in theirs.load_data_in_batches(batch_size=batch_size, random_seed=seed)
    ]
    assert len(ours_batches) == len(their_batches) > 0
    for (xo, yo), (xt, yt) in zip(ours_batches, their_batches):
        assert yo == yt
        np.testing.assert_array_equal(np.stack(xo), np.stack(xt))


def test_load_data_leaves_global_rng_as_pyspacer_does(tmp_path):
    data = _training_set(tmp_path)
    list(ImageLabels(data).load_data_in_batches(random_seed=5))
    ours_next = np.random.random()
    list(ps.ImageLabels({_ps_loc(k): v for k, v in data.items()}).load_data_in_batches(random_seed=5))
    assert np.random.random() == ours_next


def test_load_all_data_and_arrays(tmp_path):
    data = _training_set(tmp_path, n_images=3)
    labels = ImageLabels(data)
    x, y = labels.load_all_data()
    xa, ya = next(labels.load_arrays_in_batches(batch_size=None))
    assert list(y) == ya and xa.shape == (len(ya), 5)
    np.testing.assert_array_equal(np.stack(x), xa)


def test_load_data_errors_name_the_file(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "a.fv"))
    _store_both(loc, [1, 2], [3, 4], np.ones((2, 4)))
    with pytest.raises(
        RowColumnMismatchError, match=r"a\.fv: The labels' row-column positions don't match .*\(9, 9\)"
    ):
        list(ImageLabels({loc: [(1, 3, 0), (9, 9, 1)]}).load_data_in_batches())
    legacy = DataLocation("filesystem", str(tmp_path / "legacy.fv"))
    Path(legacy.key).write_text(json.dumps([[0.1, 0.2], [0.3, 0.4]]))
    with pytest.raises(
        RowColumnMissingError, match="legacy.fv: Features without rowcols are no longer supported"
    ):
        list(ImageLabels({legacy: [(1, 3, 0)]}).load_data_in_batches())


def test_load_data_uses_filesystem_cache(tmp_path, http_server):
    url = http_server.add("/f/a.fv", ImageFeatures.from_arrays(np.eye(3), [1, 2, 3], [1, 2, 3]).to_bytes())
    labels = ImageLabels({DataLocation("url", url): [(2, 2, "x")]})
    labels.set_filesystem_cache(str(tmp_path))
    for _ in range(3):
        x, y = labels.load_all_data()
        np.testing.assert_array_equal(np.stack(x), [[0.0, 1.0, 0.0]])
    assert http_server.hits["/f/a.fv"] == 1


# --- ImageFeatures ------------------------------------------------------------------


def _random_features(n=6, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, n), rng.integers(0, 3000, n), rng.normal(size=(n, dim))


def _zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_feature_file_holds_pyspacers_arrays(tmp_path):
    rows, cols, feat = _random_features()
    ours_loc = DataLocation("filesystem", str(tmp_path / "ours.fv"))
    ImageFeatures.from_arrays(feat, rows, cols).store(ours_loc)
    theirs = ps.ImageFeatures(
        point_features=[ps.PointFeatures(int(r), int(c), f) for r, c, f in zip(rows, cols, feat)],
        valid_rowcol=True,
        feature_dim=feat.shape[1],
        npoints=len(rows),
    )
    theirs.store(ps.DataLocation("filesystem", str(tmp_path / "theirs.fv")))
    # Same members with byte-identical .npy payloads; only the deflate level
    # and zip timestamps differ.
    assert _zip_members(tmp_path / "ours.fv") == _zip_members(tmp_path / "theirs.fv")
    with zipfile.ZipFile(tmp_path / "ours.fv") as archive:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())
    with np.load(tmp_path / "ours.fv") as npz:
        assert npz["meta"].dtype == np.int64 and npz["meta"].tolist() == [1, 6, 10]
        assert npz["rows"].dtype == np.uint16 and npz["cols"].dtype == np.uint16
        assert npz["feat"].dtype == np.float64


def test_feature_bytes_are_reproducible_and_level_is_honoured(monkeypatch):
    rows, cols, feat = _random_features(n=50, dim=64, seed=4)
    feats = ImageFeatures.from_arrays(np.round(feat, 2), rows, cols)
    first = feats.to_bytes()
    # A clock an hour later (zipfile stamps entries with the current time
    # unless told otherwise) must not change the bytes.
    later = time.time() + 3600
    monkeypatch.setattr(time, "time", lambda: later)
    assert feats.to_bytes() == first
    stored = feats.to_bytes(compresslevel=0)
    tight = feats.to_bytes(compresslevel=9)
    assert len(tight) < len(first) < len(stored)
    for raw in (first, stored, tight):
        assert ImageFeatures.from_bytes(raw) == feats


def test_pyspacer_reads_our_features(tmp_path):
    rows, cols, feat = _random_features(seed=1)
    loc = DataLocation("filesystem", str(tmp_path / "x.fv"))
    ImageFeatures.from_arrays(feat, rows, cols).store(loc)
    theirs = ps.ImageFeatures.load(_ps_loc(loc))
    assert theirs.valid_rowcol and theirs.npoints == 6 and theirs.feature_dim == 10
    for r, c, f in zip(rows, cols, feat):
        np.testing.assert_array_equal(theirs.get_array((int(r), int(c))), f.reshape(1, -1))


def test_we_read_pyspacer_features(tmp_path):
    theirs = ps.ImageFeatures.make_random([1, 2, 1, 3], feature_dim=7)
    theirs.store(ps.DataLocation("filesystem", str(tmp_path / "t.fv")))
    ours = ImageFeatures.load(DataLocation("filesystem", str(tmp_path / "t.fv")))
    assert ours.valid_rowcol and ours.npoints == 4 and ours.feature_dim == 7
    for pf in theirs.point_features:
        np.testing.assert_array_equal(ours[(pf.row, pf.col)], pf.data)
        assert ours.get_array((pf.row, pf.col)).shape == (1, 7)
    assert [(p.row, p.col) for p in ours.point_features] == [(p.row, p.col) for p in theirs.point_features]


def test_legacy_json_features_load_in_both(tmp_path):
    vectors = [[0.5, 1.5, 2.5], [3.0, 4.0, 5.0]]
    path = tmp_path / "legacy.featurevector"
    path.write_text(json.dumps(vectors))
    ours = ImageFeatures.load(DataLocation("filesystem", str(path)))
    theirs = ps.ImageFeatures.load(ps.DataLocation("filesystem", str(path)))
    assert not ours.valid_rowcol and not theirs.valid_rowcol
    np.testing.assert_array_equal(ours.feat, vectors)
    assert [p.row for p in ours.point_features] == [None, None]
    with pytest.raises(ValueError, match="Method not supported for legacy features"):
        ours[(0, 0)]
    with pytest.raises(RowColumnMissingError):
        list(ours.match_with_annotations([(0, 0, 1)]))


def test_npz_without_rowcols_round_trips_with_pyspacer(tmp_path):
    ours = ImageFeatures.deserialize([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    loc = DataLocation("filesystem", str(tmp_path / "norc.fv"))
    ours.store(loc)
    theirs = ps.ImageFeatures.load(_ps_loc(loc))
    assert not theirs.valid_rowcol and theirs.npoints == 3
    theirs.store(ps.DataLocation("filesystem", str(tmp_path / "norc2.fv")))
    again = ImageFeatures.load(DataLocation("filesystem", str(tmp_path / "norc2.fv")))
    assert again == ours and not again.valid_rowcol


def test_pyspacer_style_constructor_and_equality():
    pfs = [PointFeatures(1, 2, [0.1, 0.2]), PointFeatures(3, 4, [0.3, 0.4])]
    feats = ImageFeatures(point_features=pfs, valid_rowcol=True, feature_dim=2, npoints=2)
    assert feats.point_features == pfs
    assert feats == ImageFeatures.from_arrays(np.array([[0.1, 0.2], [0.3, 0.4]]), [1, 3], [2, 4])
    assert feats != ImageFeatures.from_arrays(np.array([[0.1, 0.2], [0.3, 0.4]]), [1, 3], [2, 5])
    with pytest.raises(InvalidDataError, match="npoints is 3 but 2 point features"):
        ImageFeatures(point_features=pfs, valid_rowcol=True, feature_dim=2, npoints=3)
    with pytest.raises(InvalidDataError, match="feature_dim is 5 but the vectors have 2 values"):
        ImageFeatures(point_features=pfs, valid_rowcol=True, feature_dim=5, npoints=2)
    with pytest.raises(InvalidDataError, match="at least one point"):
        ImageFeatures(point_features=[], valid_rowcol=True, feature_dim=2, npoints=0)


def test_duplicate_positions_resolve_like_pyspacer():
    pfs = [(5, 5, [1.0]), (5, 5, [2.0])]
    ours = ImageFeatures.from_arrays(np.array([[1.0], [2.0]]), [5, 5], [5, 5])
    theirs = ps.ImageFeatures([ps.PointFeatures(r, c, d) for r, c, d in pfs], True, 1, 2)
    assert ours[(5, 5)].tolist() == theirs[(5, 5)].tolist() == [2.0]


def test_match_with_annotations_order_and_errors():
    feats = ImageFeatures.from_arrays(np.arange(6.0).reshape(3, 2), [1, 2, 3], [1, 2, 3])
    pairs = list(feats.match_with_annotations([(3, 3, "a"), (1, 1, "b"), (3, 3, "c")]))
    assert [label for _, label in pairs] == ["a", "b", "c"]
    assert [v.tolist() for v, _ in pairs] == [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    with pytest.raises(RowColumnMismatchError, match=r"example: \(7, 7\)"):
        list(feats.match_with_annotations([(7, 7, "a")]))


def test_rows_beyond_uint16_are_refused():
    feats = ImageFeatures.from_arrays(np.ones((1, 2)), [70000], [1])
    with pytest.raises(ValueError, match="row outside 0..65535"):
        feats.to_bytes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 broken zip", "not a valid feature file"),
        (b"\x00\x01 binary junk", "neither npz nor JSON"),
        (b"[]", "Empty features file"),
        (b'{"a": 1}', "Deserialize only supported for legacy format"),
    ],
)
def test_bad_feature_files_name_the_key(content, message):
    storage_factory("memory").store("bad/one.featurevector", content)
    with pytest.raises(ValueError, match=f"bad/one.featurevector: .*{message}"):
        ImageFeatures.load(DataLocation("memory", "bad/one.featurevector"))


def test_make_random():
    feats = ImageFeatures.make_random([1, 2, 2], feature_dim=4)
    assert feats.npoints == 3 and feats.feature_dim == 4 and feats.valid_rowcol
    assert feats.rows.tolist() == [0, 1, 2]


# --- ValResults ---------------------------------------------------------------------


def test_val_results_round_trip_with_pyspacer(tmp_path):
    loc = DataLocation("filesystem", str(tmp_path / "val.json"))
    ValResults(scores=[0.9, 0.5], gt=[0, 1], est=[1, 1], classes=["a", 12]).store(loc)
    theirs = ps.ValResults.load(_ps_loc(loc))
    assert theirs.serialize() == {"scores": [0.9, 0.5], "gt": [0, 1], "est": [1, 1], "classes": ["a", 12]}
    assert ValResults.load(loc) == ValResults.deserialize(theirs.serialize())


def test_val_results_validation():
    with pytest.raises(InvalidDataError, match="same length"):
        ValResults(scores=[0.1], gt=[0, 1], est=[0, 1], classes=[1, 2])
    with pytest.raises(InvalidDataError, match="gt holds an index outside classes"):
        ValResults(scores=[0.1], gt=[2], est=[0], classes=[1, 2])
    with pytest.raises(AssertionError, match="est holds an index outside classes"):
        ValResults(scores=[0.1], gt=[0], est=[-1], classes=[1, 2])


# --- properties ----------------------------------------------------------------------


@st.composite
def feature_sets(draw):
    n = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 16))
    feat = draw(hnp.arrays(np.float64, (n, dim), elements=st.floats(-1e6, 1e6, allow_nan=False)))
    positions = st.integers(0, 65535)
    rows = draw(st.lists(positions, min_size=n, max_size=n))
    cols = draw(st.lists(positions, min_size=n, max_size=n))
    return feat, rows, cols


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=feature_sets())
def test_feature_files_round_trip_through_pyspacer(tmp_path, data):
    feat, rows, cols = data
    loc = DataLocation("filesystem", str(tmp_path / "p.fv"))
    ours = ImageFeatures.from_arrays(feat, rows, cols)
    ours.store(loc)
    theirs = ps.ImageFeatures.load(_ps_loc(loc))
    assert [(p.row, p.col) for p in theirs.point_features] == list(zip(rows, cols))
    np.testing.assert_array_equal(np.stack([p.data for p in theirs.point_features]), feat)
    theirs.store(ps.DataLocation("filesystem", str(tmp_path / "q.fv")))
    back = ImageFeatures.load(DataLocation("filesystem", str(tmp_path / "q.fv")))
    np.testing.assert_array_equal(back.feat, feat)
    assert back.rows.tolist() == rows and back.cols.tolist() == cols


labels_strategy = st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=8))
locations = st.builds(
    DataLocation,
    st.sampled_from(["filesystem", "memory", "url"]),
    st.text(min_size=0, max_size=20),
) | st.builds(DataLocation, st.just("s3"), st.text(max_size=20), st.text(min_size=1, max_size=10))


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    data=st.dictionaries(
        locations,
        st.lists(st.tuples(st.integers(0, 10000), st.integers(0, 10000), labels_strategy), max_size=5),
        max_size=5,
    )
)
def test_image_labels_json_matches_pyspacer_for_any_input(data):
    ours = ImageLabels(data)
    theirs = ps.ImageLabels({_ps_loc(k): v for k, v in data.items()})
    wire = json.dumps(ours.serialize())
    assert wire == json.dumps(theirs.serialize())
    assert ImageLabels.deserialize(json.loads(wire)) == ours
    assert ours.label_count == theirs.label_count
    assert ours.classes_set == theirs.classes_set
