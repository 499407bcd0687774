"""Hostile clients against `spacer serve` with its default flags: races, sizes and long work.

One real server process (module scope; data root = its working directory)
answers every case over loopback gRPC. The cases:

- check-then-open races: a thread flips a symlink between a target inside
  the data root and one outside while the client calls; nothing from
  outside is ever read, nothing is written outside, and a weights file
  swapped under a verified hash never yields another network's features;
- sizes: epochs, MLP layers, DummyExtractor feature_dim, a Caffe definition
  padded to gigabytes, a feature-file zip bomb, long tokens and keys, and a
  stream whose client never reads its replies;
- long work: trainings that fill the long-work share leave ClassifyImage
  prompt; a cancelled training and a RunJob past its deadline stop.

After every case: the status code, no file left outside the root, the
server's RSS (and peak RSS) within a bound of its warmed-up size, health
SERVING and a normal ClassifyImage answering.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient
from server.testing import ServeProcess
from spacer_core.data_classes import DataLocation, ImageFeatures, ImageLabels
from spacer_core.messages import ExtractFeaturesMsg, JobMsg, TrainClassifierMsg, TrainingTaskLabels
from spacer_core.testing import make_classifier, make_image
from spacer_core.train_classifier import MiniBatchTrainer
from spacer_core.weights.caffe_synthetic import conv, write_net
from spacer_core.weights.synthetic import make_weights
from tests.support.hostile_files import lying_header, zip_bomb

Code = grpc.StatusCode
DUMMY = {"class_path": "spacer.extractors.base.DummyExtractor", "data_locations": {}}
# What one case may add to the server's memory (MiB), after it and at its peak.
RSS_GROWTH_MIB = 300
PEAK_GROWTH_MIB = 450


def fs(path: Path | str) -> DataLocation:
    return DataLocation("filesystem", str(path))


@dataclass
class Server:
    proc: ServeProcess
    client: SpacerClient
    root: Path
    outside: Path
    expected_outside: dict[str, bytes] = field(default_factory=dict)
    # A case that loads networks (kept by the runtime's cache) may use more.
    rss_allowance: float = RSS_GROWTH_MIB

    def planted(self, *paths: Path) -> None:
        """Record files a test itself put outside the root (the server must leave them as they are)."""
        for path in paths:
            self.expected_outside[str(path.relative_to(self.outside))] = path.read_bytes()

    def normal_classify(self) -> pb.ClassifyResponse:
        return self.client.classify_image(
            DUMMY, [(10, 10), (20, 30)], fs(self.root / "img.png"), fs(self.root / "clf.pkl"), timeout=60
        )


def _outside_listing(outside: Path) -> dict[str, bytes]:
    return {str(p.relative_to(outside)): p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    make_image(root / "img.png", 200, 150)
    make_classifier(root / "clf.pkl", feature_dim=4096)
    env = {"XDG_CACHE_HOME": str(base / "cache")}
    with ServeProcess(root, env=env) as proc, SpacerClient(proc.address, timeout=120) as client:
        srv = Server(proc, client, root, outside)
        srv.normal_classify()  # warm: classifier loaded, pools started
        yield srv


@pytest.fixture
def case(server: Server) -> Iterator[Server]:
    """The server; afterwards checks the outside folder, memory, health and a normal call."""
    server.expected_outside = _outside_listing(server.outside)
    server.rss_allowance = RSS_GROWTH_MIB
    before = server.proc.status()
    yield server
    assert _outside_listing(server.outside) == server.expected_outside, (
        "a file outside the data root was written"
    )
    after = server.proc.status()
    assert after.rss_mib - before.rss_mib < server.rss_allowance, (before, after)
    if after.peak_rss_mib > before.peak_rss_mib:  # the peak was reached during this case
        assert (
            after.peak_rss_mib - before.rss_mib < server.rss_allowance + PEAK_GROWTH_MIB - RSS_GROWTH_MIB
        ), (before, after)
    assert server.client.health() == "SERVING"
    assert len(server.normal_classify().scores) == 2


def expect(code: Code, call: Callable[[], Any], *names: str) -> grpc.RpcError:
    """Run `call`, expect an RpcError with `code` whose message names each of `names`."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for name in names:
        assert name in details, details
    assert "Traceback" not in details and "site-packages" not in details
    return err.value


# ---------------------------------------------------------------- helpers


def write_features(path: Path, npoints: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = list(range(npoints))
    ImageFeatures.from_arrays(rng.normal(size=(npoints, dim)).astype(np.float32), rows, rows).store(fs(path))


def train_labels(root: Path, images: int, points: int, dim: int, classes: int = 3) -> ImageLabels:
    data = {}
    for i in range(images):
        path = root / "train" / f"{dim}-{points}-{i}.featurevector"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            write_features(path, points, dim, seed=i)
        data[fs(path)] = [(r, r, 1 + (r + i) % classes) for r in range(points)]
    return ImageLabels(data)


def train_msg(
    root: Path,
    *,
    epochs: int = 1,
    trainer: Any = None,
    clf_type: str = "LR",
    images: int = 2,
    points: int = 20,
    dim: int = 16,
    token: str = "t",
) -> TrainClassifierMsg:
    labels = train_labels(root, images, points, dim)
    return TrainClassifierMsg(
        job_token=token,
        trainer=trainer or MiniBatchTrainer(),
        nbr_epochs=epochs,
        clf_type=clf_type,
        labels=TrainingTaskLabels(train=labels, ref=labels, val=labels),
        model_loc=fs(root / "out" / "model.pkl"),
        valresult_loc=fs(root / "out" / "valres.json"),
        feature_cache_dir=TrainClassifierMsg.FeatureCache.DISABLED,
    )


def train_request(
    msg: TrainClassifierMsg, epochs: int | None = None, token: str = "t"
) -> pb.TrainClassifierRequest:
    def images(labels: ImageLabels) -> pb.ImageLabels:
        return pb.ImageLabels(
            images=[
                pb.ImageAnnotations(
                    feature_loc=pb.DataLocation(storage_type="filesystem", key=loc.key),
                    annotations=[
                        pb.Annotation(row=r, col=c, label=pb.Label(id=int(lab))) for r, c, lab in anns
                    ],
                )
                for loc, anns in labels.items()
            ]
        )

    return pb.TrainClassifierRequest(
        job_token=token,
        trainer="minibatch",
        nbr_epochs=epochs or msg.nbr_epochs,
        clf_type=msg.clf_type,
        labels=pb.TrainingTaskLabels(
            train=images(msg.labels.train), ref=images(msg.labels.ref), val=images(msg.labels.val)
        ),
        model_loc=pb.DataLocation(storage_type="filesystem", key=msg.model_loc.key),
        valresult_loc=pb.DataLocation(storage_type="filesystem", key=msg.valresult_loc.key),
        feature_cache_dir="disabled",
    )


def wide_classifier(path: Path, classes: int, dim: int = 4096) -> None:
    """A quickly fitted classifier with many classes (large replies)."""
    import pickle

    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import SGDClassifier

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(1, classes + 1), 2)
    x = rng.normal(size=(len(y), dim))
    clf = SGDClassifier(loss="log_loss", max_iter=3, tol=None).fit(x, y)
    path.write_bytes(pickle.dumps(CalibratedClassifierCV(clf, cv="prefit").fit(x, y), protocol=2))


def job_json(task_name: str, *tasks: Any) -> str:
    return json.dumps(JobMsg(task_name, list(tasks)).serialize())


class Flipper:
    """A thread that points `link` at `inside` and `outside` in turn (atomic rename) until stopped.

    `outside_share` flips of every `outside_share + 1` point outside.
    """

    def __init__(self, link: Path, inside: Path, outside: Path, outside_share: int = 1):
        self.link, self.targets, self.flips = link, (inside,) + (outside,) * outside_share, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._set(inside)

    def _set(self, target: Path) -> None:
        tmp = self.link.with_name(f".{self.link.name}.flip")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, self.link)

    def _run(self) -> None:
        while not self._stop.is_set() and self.flips < 1_000_000:
            self._set(self.targets[self.flips % len(self.targets)])
            self.flips += 1

    def __enter__(self) -> Flipper:
        # Switch threads often, so the flips interleave with the client's calls.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        sys.setswitchinterval(self._interval)
        self._set(self.targets[0])


# ---------------------------------------------------------------- 3. check-then-open races

RACE_CALLS = 40


def _race_scores(
    server: Server, call: Callable[[], pb.ClassifyResponse], calls: int = RACE_CALLS
) -> list[Any]:
    """Outcomes of `calls` calls: the classes of a result, or the status code of a refusal."""
    outcomes: list[Any] = []
    for _ in range(calls):
        try:
            reply = call()
            outcomes.append((tuple(label.id for label in reply.classes), reply.scores[0].scores[0]))
        except grpc.RpcError as err:
            assert err.code() in (Code.PERMISSION_DENIED, Code.NOT_FOUND), err.details()
            outcomes.append(err.code())
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "folder"])
def test_race_feature_read_never_returns_outside_bytes(case: Server, what: str) -> None:
    root, outside = case.root, case.outside
    (root / "rf").mkdir(exist_ok=True)
    (outside / "rf").mkdir(exist_ok=True)
    write_features(root / "rf" / "f.featurevector", 3, 4096, seed=1)
    write_features(outside / "rf" / "f.featurevector", 3, 4096, seed=2)  # other values, other scores
    case.planted(outside / "rf" / "f.featurevector")
    inside_reply = case.client.classify_features(fs(root / "rf" / "f.featurevector"), fs(root / "clf.pkl"))
    inside = (tuple(label.id for label in inside_reply.classes), inside_reply.scores[0].scores[0])
    if what == "file":
        link, a, b = (
            root / "rf" / "link.featurevector",
            root / "rf" / "f.featurevector",
            outside / "rf" / "f.featurevector",
        )
        key = link
    else:
        link, a, b = root / "rflink", root / "rf", outside / "rf"
        key = link / "f.featurevector"
    outcomes: list[Any] = []
    with Flipper(link, a, b) as flipper:
        for _ in range(3):  # a loaded machine may see one side of the race in a round; at most 3 rounds
            outcomes += _race_scores(
                case, lambda: case.client.classify_features(fs(key), fs(root / "clf.pkl"))
            )
            if inside in outcomes and Code.PERMISSION_DENIED in outcomes:
                break
    assert flipper.flips >= 10
    assert all(o == inside or o in (Code.PERMISSION_DENIED, Code.NOT_FOUND) for o in outcomes), outcomes
    assert inside in outcomes and Code.PERMISSION_DENIED in outcomes, "the link changed during the calls"


@pytest.mark.slow
def test_race_classifier_never_loads_outside_model(case: Server) -> None:
    root, outside = case.root, case.outside
    make_classifier(root / "clf_in.pkl", feature_dim=4096, classes=(1, 2, 3))
    make_classifier(outside / "clf_out.pkl", feature_dim=4096, classes=(7, 8, 9))
    case.planted(outside / "clf_out.pkl")
    link = root / "clf_link.pkl"
    with Flipper(link, root / "clf_in.pkl", outside / "clf_out.pkl"):
        outcomes = _race_scores(
            case,
            lambda: case.client.classify_image(DUMMY, [(5, 5)], fs(root / "img.png"), fs(link)),
            calls=4 * RACE_CALLS,
        )
    for outcome in outcomes:
        assert outcome in (Code.PERMISSION_DENIED, Code.NOT_FOUND) or outcome[0] == (1, 2, 3), outcomes


@pytest.mark.parametrize("what", ["file", "folder"])
def test_race_feature_write_never_lands_outside(case: Server, what: str) -> None:
    root, outside = case.root, case.outside
    (root / "wf").mkdir(exist_ok=True)
    (outside / "wf").mkdir(exist_ok=True)
    (outside / "wf" / "out.featurevector").write_bytes(b"outside, untouched")
    case.planted(outside / "wf" / "out.featurevector")
    (root / "wf" / "out.featurevector").write_bytes(b"inside")
    if what == "file":
        link = root / "wf" / "link.featurevector"
        flip = Flipper(link, root / "wf" / "out.featurevector", outside / "wf" / "out.featurevector")

        def key_for(i: int) -> Path:
            return link

    else:
        link = root / "wflink"
        flip = Flipper(link, root / "wf", outside / "wf")

        def key_for(i: int) -> Path:
            return link / f"f{i}.featurevector"

    before = _outside_listing(outside)
    written = 0
    with flip:
        # A write checks its folder more than once; each check must see the link inside, so
        # on a loaded machine a round of RACE_CALLS may land none: go on (bounded) until one does.
        for i in range(RACE_CALLS * 5):
            if i >= RACE_CALLS and written:
                break
            try:
                case.client.extract_features(DUMMY, [(5, 5)], fs(root / "img.png"), fs(key_for(i)))
                written += 1
            except grpc.RpcError as err:
                assert err.code() in (Code.PERMISSION_DENIED, Code.NOT_FOUND), err.details()
    assert _outside_listing(outside) == before
    assert written, "no write landed inside either"
    if what == "file":
        assert ImageFeatures.load(fs(root / "wf" / "out.featurevector")).feature_dim == 4096


@pytest.mark.slow
def test_race_weights_swap_never_yields_other_weights(case: Server) -> None:
    """A verified hash names weights A; the path flips between A and B (both inside the root).

    The link points at B two flips in three, so a network built after A's
    hash was checked would mostly be read from B; two A files, two chances.
    """
    root = case.root
    case.rss_allowance = 1000  # three EfficientNet networks stay loaded (the runtime keeps up to 4)
    sha_b = make_weights(root / "wb.pt", seed=2)
    b = None
    for seed in (1, 3):
        sha_a = make_weights(root / f"wa{seed}.pt", seed=seed)
        b = _weights_race(case, root / f"wa{seed}.pt", sha_a, root / "wb.pt", sha_b, b)


def _weights_race(
    case: Server, path_a: Path, sha_a: str, path_b: Path, sha_b: str, b: np.ndarray | None
) -> np.ndarray:
    """Features through a link flipping A/B under A's hash; returns B's features."""
    root = case.root
    link = root / "wlink.pt"

    def extractor(path: Path, sha: str) -> dict[str, Any]:
        return {
            "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
            "data_locations": {"weights": {"storage_type": "filesystem", "key": str(path)}},
            "data_hashes": {"weights": sha},
        }

    def features(path: Path, sha: str) -> np.ndarray:
        reply = case.client.extract_features(
            extractor(path, sha), [(50, 50)], fs(root / "img.png"), return_features=True, timeout=300
        )
        return np.array(reply.features.point_features[0].data)

    results = []
    with Flipper(link, path_a, path_b, outside_share=2):
        for _ in range(80):  # the first successful call builds A's network during the race
            try:
                results.append(features(link, sha_a))
            except grpc.RpcError as err:
                assert err.code() == Code.FAILED_PRECONDITION, err.details()
                assert "weights" in (err.details() or "")
            if len(results) >= 3:
                break
    a = features(path_a, sha_a)
    b = features(path_b, sha_b) if b is None else b
    assert not np.allclose(a, b), "the two weights files give different features"
    assert results, "no call succeeded during the race"
    for got in results:
        np.testing.assert_array_equal(got, a)
    return b


# ---------------------------------------------------------------- 4. sizes


def test_train_epochs_over_limit(case: Server) -> None:
    msg = train_msg(case.root)
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: list(case.client.train_classifier(train_request(msg, 10**8))),
        "nbr_epochs",
    )


def test_runjob_epochs_over_limit(case: Server) -> None:
    msg = train_msg(case.root, epochs=10**8)
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: case.client.run_job(job_json("train_classifier", msg)),
        "nbr_epochs",
        "tasks[0]",
    )
    assert not (case.root / "out" / "model.pkl").exists()


@pytest.mark.parametrize("sizes", [(3000, 3000), (100, 100, 100, 100, 100), (10**9,)])
def test_runjob_mlp_layers_over_limit(case: Server, sizes: tuple[int, ...]) -> None:
    msg = train_msg(case.root, trainer=MiniBatchTrainer(mlp_hidden_layer_sizes=sizes), clf_type="MLP")
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: case.client.run_job(job_json("train_classifier", msg)),
        "mlp_hidden_layer_sizes",
    )
    assert not (case.root / "out" / "model.pkl").exists()


def test_runjob_dummy_feature_dim_over_limit(case: Server) -> None:
    from spacer_core.extractors import DummyExtractor

    msg = ExtractFeaturesMsg(
        "x",
        DummyExtractor(feature_dim=10**8),
        [(5, 5)],
        fs(case.root / "img.png"),
        fs(case.root / "huge.featurevector"),
    )
    expect(
        Code.RESOURCE_EXHAUSTED, lambda: case.client.run_job(job_json("extract_features", msg)), "feature_dim"
    )
    assert not (case.root / "huge.featurevector").exists()


def test_runjob_dummy_feature_dim_in_json_over_limit(case: Server) -> None:
    from spacer_core.extractors import DummyExtractor

    msg = ExtractFeaturesMsg(
        "x",
        DummyExtractor(feature_dim=8192 + 1),
        [(5, 5)],
        fs(case.root / "img.png"),
        fs(case.root / "wide.featurevector"),
    )
    expect(
        Code.RESOURCE_EXHAUSTED, lambda: case.client.run_job(job_json("extract_features", msg)), "feature_dim"
    )


@pytest.mark.parametrize("channels, code", [(1, Code.RESOURCE_EXHAUSTED), (64, Code.FAILED_PRECONDITION)])
def test_caffe_definition_padded_to_gigabytes(case: Server, channels: int, code: Code) -> None:
    folder = case.root / f"caffe{channels}"
    layers = [conv("fc7", "data", 3, channels, np.random.default_rng(0), kernel=1, pad=1000)]
    definition, weights = write_net(folder, "padded", layers)
    assert definition.stat().st_size < 400
    extractor = {
        "class_path": "spacer.extractors.vgg16.VGG16CaffeExtractor",
        "data_locations": {
            "definition": {"storage_type": "filesystem", "key": str(definition)},
            "weights": {"storage_type": "filesystem", "key": str(weights)},
        },
    }
    expect(code, lambda: case.client.load_model(extractor=extractor), "fc7")
    expect(
        code,
        lambda: case.client.extract_features(
            extractor, [(5, 5)], fs(case.root / "img.png"), fs(folder / "f.featurevector")
        ),
        "fc7",
    )
    assert not (folder / "f.featurevector").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bomb", "lying header"])
def test_feature_file_that_inflates(case: Server, kind: str) -> None:
    path = case.root / f"bomb-{kind.replace(' ', '-')}.featurevector"
    if not path.exists():
        zip_bomb(path, 500) if kind == "bomb" else lying_header(path)
    assert path.stat().st_size < 1 << 20
    code = Code.RESOURCE_EXHAUSTED
    expect(code, lambda: case.client.classify_features(fs(path), fs(case.root / "clf.pkl")), path.name)


@pytest.mark.slow
def test_feature_file_bomb_in_training(case: Server) -> None:
    path = case.root / "bomb-bomb.featurevector"
    if not path.exists():
        zip_bomb(path, 500)
    msg = train_msg(case.root)
    request = train_request(msg)
    request.labels.train.images[0].feature_loc.key = str(path)
    expect(Code.RESOURCE_EXHAUSTED, lambda: list(case.client.train_classifier(request)), path.name)


BIG = "x" * (1 << 20)


@pytest.mark.parametrize("rpc", ["ClassifyImage", "ExtractFeatures", "ClassifyFeatures", "TrainClassifier"])
def test_megabyte_job_token(case: Server, rpc: str) -> None:
    root, c = case.root, case.client
    calls: dict[str, Callable[[], Any]] = {
        "ClassifyImage": lambda: c.classify_image(
            DUMMY, [(5, 5)], fs(root / "img.png"), fs(root / "clf.pkl"), job_token=BIG
        ),
        "ExtractFeatures": lambda: c.extract_features(
            DUMMY, [(5, 5)], fs(root / "img.png"), fs(root / "tok.featurevector"), job_token=BIG
        ),
        "ClassifyFeatures": lambda: c.classify_features(
            fs(root / "x.featurevector"), fs(root / "clf.pkl"), job_token=BIG
        ),
        "TrainClassifier": lambda: list(c.train_classifier(train_request(train_msg(root), token=BIG))),
    }
    expect(Code.RESOURCE_EXHAUSTED, calls[rpc], "job_token")
    assert not (root / "tok.featurevector").exists()


@pytest.mark.parametrize("which", ["feature_loc", "classifier_loc"])
def test_megabyte_key(case: Server, which: str) -> None:
    locs = {"feature_loc": fs(case.root / "x.featurevector"), "classifier_loc": fs(case.root / "clf.pkl")}
    locs[which] = fs(str(case.root) + "/" + BIG)
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: case.client.classify_features(locs["feature_loc"], locs["classifier_loc"]),
        f"{which}.key",
    )


def test_megabyte_key_in_load_model(case: Server) -> None:
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: case.client.load_model(classifier_loc=fs(str(case.root) + "/" + BIG)),
        "classifier_loc.key",
    )


def test_megabyte_token_and_key_in_runjob(case: Server) -> None:
    from spacer_core.extractors import DummyExtractor

    token_msg = ExtractFeaturesMsg(
        BIG, DummyExtractor(), [(5, 5)], fs(case.root / "img.png"), fs(case.root / "t.featurevector")
    )
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: case.client.run_job(job_json("extract_features", token_msg)),
        "job_token",
    )
    key_msg = ExtractFeaturesMsg(
        "k", DummyExtractor(), [(5, 5)], fs(case.root / "img.png"), fs(str(case.root) + "/" + BIG)
    )
    expect(Code.RESOURCE_EXHAUSTED, lambda: case.client.run_job(job_json("extract_features", key_msg)), "key")


def test_megabyte_token_in_stream_is_an_error_item(case: Server) -> None:
    req = SpacerClient.image_request(
        DUMMY, [(5, 5)], fs(case.root / "img.png"), fs(case.root / "clf.pkl"), BIG
    )
    ok = SpacerClient.image_request(
        DUMMY, [(5, 5)], fs(case.root / "img.png"), fs(case.root / "clf.pkl"), "ok"
    )
    replies = list(case.client.classify_images([req, ok]))
    by_token = {r.job_token[:8]: r for r in replies}
    assert by_token["xxxxxxxx"].error.code_name == "RESOURCE_EXHAUSTED"
    assert "job_token" in by_token["xxxxxxxx"].error.message
    assert by_token["ok"].WhichOneof("outcome") == "result"


def _read_with_no_reply_read(
    open_stream: Callable[[Iterator[Any]], Any], request: Callable[[int], Any], total: int = 400
) -> int:
    """How many of `total` requests the server reads in 8 s from a client that reads no reply."""
    pulled = 0

    def requests() -> Iterator[Any]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield request(i)

    stream = open_stream(requests())
    time.sleep(8)  # the server works through what it reads; nobody reads its replies
    held = pulled
    stream.cancel()
    return held


@pytest.mark.slow
def test_stream_client_that_never_reads_replies(case: Server) -> None:
    """Requests of ~300 KiB, replies of ~350 KiB; the client reads no reply. The server must stop reading too."""
    wide_classifier(case.root / "wide.pkl", classes=200)
    make_image(case.root / "big.png", 400, 300, seed=3)
    payload = (case.root / "big.png").read_bytes()
    assert len(payload) > 200_000
    held = _read_with_no_reply_read(
        lambda requests: case.client.stub.ClassifyImages(requests, timeout=120),
        lambda i: pb.ClassifyImageRequest(
            job_token=f"s{i}",
            extractor=pb.Extractor(class_path=DUMMY["class_path"]),
            rowcols=[pb.RowCol(row=r % 300, col=r % 400) for r in range(200)],
            classifier_loc=pb.DataLocation(storage_type="filesystem", key=str(case.root / "wide.pkl")),
            image_bytes=payload,
        ),
    )
    assert held < 200, f"the server read {held} of 400 requests with no reply read"


@pytest.mark.slow
def test_oip_stream_client_that_never_reads_replies(case: Server) -> None:
    """The Open Inference Protocol's stream has the same bound: replies of ~160 KiB nobody reads."""
    from server._proto.inference import grpc_service_pb2 as ipb
    from server._proto.inference import grpc_service_pb2_grpc as ipbg

    wide_classifier(case.root / "wide_oip.pkl", classes=200, dim=64)
    stub = ipbg.GRPCInferenceServiceStub(case.client.channel)
    config = json.dumps(
        {"classifier": {"storage_type": "filesystem", "key": str(case.root / "wide_oip.pkl")}}
    )
    stub.RepositoryModelLoad(
        ipb.RepositoryModelLoadRequest(
            model_name="wide_oip", parameters={"config": ipb.ModelRepositoryParameter(string_param=config)}
        ),
        timeout=60,
    )
    features = np.random.default_rng(1).normal(size=(200, 64)).astype(np.float32).tobytes()
    held = _read_with_no_reply_read(
        lambda requests: stub.ModelStreamInfer(requests, timeout=120),
        lambda i: ipb.ModelInferRequest(
            model_name="wide_oip",
            id=f"s{i}",
            raw_input_contents=[features],
            inputs=[
                ipb.ModelInferRequest.InferInputTensor(name="FEATURES", datatype="FP32", shape=[200, 64])
            ],
        ),
    )
    assert held < 200, f"the server read {held} of 400 requests with no reply read"


# ---------------------------------------------------------------- 5. long work


def _long_training(root: Path, token: str) -> pb.TrainClassifierRequest:
    msg = train_msg(root, epochs=200, clf_type="MLP", images=8, points=300, dim=512, token=token)
    return train_request(msg, token=token)


def _cpu_quiet(server: Server, seconds: float = 3.0) -> float:
    """CPU seconds the server used over `seconds`."""
    start = server.proc.status().cpu_s
    time.sleep(seconds)
    return server.proc.status().cpu_s - start


@pytest.mark.slow
def test_long_trainings_leave_a_worker_for_classify_image(case: Server) -> None:
    streams = [case.client.train_classifier(_long_training(case.root, "long0"), timeout=300)]
    first = next(iter(streams[0]))  # the first training is running (an epoch finished)
    assert first.WhichOneof("event") == "progress"
    # More trainings than the long-work share holds: without a share they take every worker.
    streams += [
        case.client.train_classifier(_long_training(case.root, f"long{i}"), timeout=300) for i in (1, 2)
    ]
    time.sleep(1)
    start = time.monotonic()
    reply = case.normal_classify()
    took = time.monotonic() - start
    assert len(reply.scores) == 2
    assert took < 15, f"ClassifyImage took {took:.1f}s while trainings ran"
    for stream in streams:
        stream.cancel()
    time.sleep(2)
    used = _cpu_quiet(case)
    assert used < 1.0, f"cancelled trainings kept running: {used:.1f} CPU s in 3 s"


@pytest.mark.slow
def test_cancelled_training_stops(case: Server) -> None:
    stream = case.client.train_classifier(_long_training(case.root, "cancel"), timeout=300)
    events = iter(stream)
    next(events)
    stream.cancel()
    time.sleep(2)
    assert _cpu_quiet(case) < 1.0
    assert not (case.root / "out" / "model.pkl").exists()


@pytest.mark.slow
def test_runjob_past_its_deadline_stops(case: Server) -> None:
    msg = train_msg(case.root, epochs=200, clf_type="MLP", images=8, points=300, dim=512, token="deadline")
    expect(Code.DEADLINE_EXCEEDED, lambda: case.client.run_job(job_json("train_classifier", msg), timeout=4))
    time.sleep(2)
    assert _cpu_quiet(case) < 1.0
    assert not (case.root / "out" / "model.pkl").exists()


# ---------------------------------------------------------------- checks before work


@pytest.mark.parametrize("which", ["valresult_loc", "model_loc"])
def test_training_with_an_outside_output_is_refused_before_training(case: Server, which: str) -> None:
    """Every output location is checked before any feature is read or epoch run: nothing
    streams back and no other output is written."""
    msg = train_msg(case.root, epochs=3, token=f"out-{which}")
    outside = fs(case.outside / f"{which}.out")
    setattr(msg, which, outside)
    request = train_request(msg)
    getattr(request, which).key = outside.key
    (case.root / "out" / "model.pkl").unlink(missing_ok=True)
    (case.root / "out" / "valres.json").unlink(missing_ok=True)
    progress: list[Any] = []

    def train() -> None:
        for reply in case.client.train_classifier(request):
            progress.append(reply)

    expect(Code.PERMISSION_DENIED, train, f"{which}.out")
    assert not progress, progress
    reply = case.client.run_job(job_json("train_classifier", msg))  # a job's error is in its reply
    assert not reply["ok"] and f"{which}.out" in reply["error_message"], reply["error_message"]
    assert not (case.root / "out" / "model.pkl").exists() and not (case.root / "out" / "valres.json").exists()


def test_oip_load_checks_the_extractor_limits(case: Server) -> None:
    """A DummyExtractor wider than the limit is refused when loaded, not first when called."""
    from server._proto.inference import grpc_service_pb2 as ipb
    from server._proto.inference import grpc_service_pb2_grpc as ipbg

    stub = ipbg.GRPCInferenceServiceStub(case.client.channel)
    config = json.dumps({"extractor": dict(DUMMY, feature_dim=10**9)})
    expect(
        Code.RESOURCE_EXHAUSTED,
        lambda: stub.RepositoryModelLoad(
            ipb.RepositoryModelLoadRequest(
                model_name="wide", parameters={"config": ipb.ModelRepositoryParameter(string_param=config)}
            ),
            timeout=60,
        ),
        "feature_dim",
    )
    index = stub.RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=30)
    assert not [m for m in index.models if m.name == "wide" and m.state == "READY"]


# ---------------------------------------------------------------- memory of Pillow-decoded images


def _solid(fmt: str, size: tuple[int, int], mode: str, **options: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, (30, 90, 150, 255)[: len(mode)] if mode != "L" else 90).save(buffer, fmt, **options)
    return buffer.getvalue()


def _interlaced_png(width: int, height: int, colour: int = 6, depth: int = 16) -> bytes:
    """An Adam7-interlaced PNG of zeros (Pillow writes no interlaced PNGs)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    packer = zlib.compressobj(9)
    rows = []
    for xs, ys, x0, y0 in (
        (8, 8, 0, 0),
        (8, 8, 4, 0),
        (4, 8, 0, 4),
        (4, 4, 2, 0),
        (2, 4, 0, 2),
        (2, 2, 1, 0),
        (1, 2, 0, 1),
    ):
        pass_width, pass_height = (width - x0 + xs - 1) // xs, (height - y0 + ys - 1) // ys
        row = bytes(1 + (pass_width * channels * depth + 7) // 8)
        rows += [packer.compress(row) for _ in range(pass_height if pass_width else 0)]
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(rows) + packer.flush())
        + chunk(b"IEND", b"")
    )


def _jpeg(mode: str, **options: Any) -> bytes:
    import io

    from PIL import Image

    # Smooth content keeps the file small: what is measured is the decoder, not the request's bytes.
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    pixels = np.stack([np.broadcast_to(ramp, (3000, 4000))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


# Images whose decoding holds more than their RGB output: Pillow's formats, and
# the Rust decoders' interlaced PNG, progressive and CMYK JPEG.
DECODED_IMAGES = {
    "webp-lossless-rgba": lambda: _solid("WEBP", (4000, 3000), "RGBA", lossless=True),
    "webp-lossy": lambda: _solid("WEBP", (4000, 3000), "RGB"),
    "tiff-deflate-rgb": lambda: _solid("TIFF", (6000, 4000), "RGB", compression="tiff_deflate"),
    "png-interlaced-16bit-rgba": lambda: _interlaced_png(4000, 3000),
    "jpeg-progressive-444": lambda: _jpeg("RGB", progressive=True, subsampling=0, quality=95),
    "jpeg-cmyk": lambda: _jpeg("CMYK", quality=90),
}


@pytest.fixture(scope="module")
def memory_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServeProcess, SpacerClient, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("memory")
    sha = make_weights(root / "w.pt", seed=3)
    extractor = {
        "class_path": "spacer.extractors.efficientnet.EfficientNetExtractor",
        "data_locations": {"weights": {"storage_type": "filesystem", "key": str(root / "w.pt")}},
        "data_hashes": {"weights": sha},
    }
    env = {"XDG_CACHE_HOME": str(root / "cache")}
    with ServeProcess(root, env=env) as proc, SpacerClient(proc.address, timeout=120) as client:
        for small in (
            _solid("WEBP", (300, 200), "RGBA", lossless=True),
            _solid("WEBP", (300, 200), "RGB"),
            _solid("TIFF", (300, 200), "RGB", compression="tiff_deflate"),
        ):  # warm: network, plugins
            client.extract_features(extractor, [(5, 5)], small, return_features=True)
        yield proc, client, extractor


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODED_IMAGES))
def test_decoded_image_is_charged_what_it_holds(memory_server: Any, name: str) -> None:
    """The memory budget's charge for an image covers what decoding it really adds to the
    server's memory (sampled while the call runs), whichever decoder holds it."""
    from spacer_core import crop, pipeline

    proc, client, extractor = memory_server
    data = DECODED_IMAGES[name]()
    width, height = crop.image_size(data)
    charged = pipeline.Footprint.of(len(data), crop.decoded_bytes(data, width, height), 1, 224, 1).cutting
    base = proc.status().rss_mib
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.status().rss_mib)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client.extract_features(extractor, [(5, 5)], data, return_features=True)
    finally:
        done.set()
        sampler.join()
    growth = peak[0] - base
    assert growth <= 1.2 * charged / 2**20 + 40, (name, growth, charged / 2**20)
    kept = proc.status().rss_mib - base  # freed image buffers go back to the system
    assert kept <= 64, (name, kept, growth)
