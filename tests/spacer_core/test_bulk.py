"""Bulk work on the local engine (spacer_core.bulk.local, `spacer bulk`): real files, S3 (moto), HTTP, pyspacer."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest

from shell.main import main
from spacer_core.bulk import local as bulk
from spacer_core.data_classes import DataLocation
from spacer_core.exceptions import InvalidInputError
from spacer_core.storage import DataRootsPolicy, load_classifier
from spacer_core.survey.workflow import weights_extractor
from spacer_core.testing import make_survey, read_features, write_classifier, write_image, write_manifest
from tests.support.bulk_survey import assert_matches_pyspacer

spacer = pytest.importorskip("spacer")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return make_survey(tmp_path_factory.mktemp("bulk"), images=6, points=8)


def test_plan_keeps_manifest_order_resolves_names_and_shards(tmp_path):
    manifest = write_manifest(
        tmp_path / "m.csv",
        {
            "b.jpg": [(1, 2)],
            "sub/a.png": [(3, 4), (5, 6)],
            "s3://bucket/deep/key/c.jpg": [(7, 8)],
            "https://example.org/x/d.jpg?v=1": [(9, 9)],
        },
    )
    items = bulk.plan(manifest)
    assert [i.name for i in items] == [
        "b.jpg",
        "sub/a.png",
        "s3://bucket/deep/key/c.jpg",
        "https://example.org/x/d.jpg?v=1",
    ]
    assert items[1].location == DataLocation("filesystem", str(tmp_path / "sub" / "a.png"))
    assert items[1].rowcols == ((3, 4), (5, 6))
    assert items[2].location == DataLocation("s3", "deep/key/c.jpg", bucket_name="bucket")
    assert items[3].location == DataLocation("url", "https://example.org/x/d.jpg?v=1")
    assert [i.file_name for i in items] == ["b.jpg", "a.png", "c.jpg", "d.jpg"]
    shards = [bulk.plan(manifest, k, 3) for k in range(3)]
    assert [[i.name for i in s] for s in shards] == [
        ["b.jpg", "https://example.org/x/d.jpg?v=1"],
        ["sub/a.png"],
        ["s3://bucket/deep/key/c.jpg"],
    ]
    with pytest.raises(InvalidInputError, match="shard 3 of 3"):
        bulk.plan(manifest, 3, 3)


def test_plan_refuses_two_names_with_one_file_name(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", {"x/a.jpg": [(1, 1)], "s3://b/y/a.jpg": [(1, 1)]})
    with pytest.raises(InvalidInputError, match=r"'x/a.jpg' and 's3://b/y/a.jpg' end in the same file name"):
        bulk.plan(manifest)


@pytest.mark.slow
def test_extract_matches_pyspacer_and_records_every_image(survey, tmp_path, capsys):
    out = tmp_path / "features"
    code = main(
        [
            "bulk",
            "extract",
            "--weights",
            str(survey.weights),
            "--manifest",
            str(survey.manifest),
            "--out",
            str(out),
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["images"], report["ok"], report["failed"], report["points"]) == (6, 6, 0, 48)
    summary = json.loads((out / "_summary.json").read_text())
    assert set(summary["outputs"]) == {f"images/{p.name}" for p in survey.images}
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # Oracle: pyspacer on one image.
    image = survey.images[0]
    assert_matches_pyspacer(survey.weights, image, out / f"{image.name}.featurevector", tmp_path)


def test_corrupt_missing_and_refused_images_are_recorded_and_the_rest_complete(tmp_path, capsys):
    good = write_image(tmp_path / "good.jpg", 1)
    (tmp_path / "corrupt.jpg").write_bytes(good.read_bytes()[:400])
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    write_image(outside / "far.jpg", 2)
    manifest = write_manifest(
        tmp_path / "m.csv",
        {
            "good.jpg": [(10, 10), (100, 200)],
            "corrupt.jpg": [(10, 10)],
            "missing.jpg": [(5, 5)],
            f"../{outside.name}/far.jpg": [(1, 1)],
        },
    )
    task = bulk.BulkTask.extract(
        weights_extractor(make_survey_weights()),
        tmp_path / "out",
        policy=DataRootsPolicy([tmp_path, make_survey_weights().parent]),
    )
    summary = bulk.run(task, bulk.plan(manifest))
    entries = json.loads((tmp_path / "out" / "_summary.json").read_text())["outputs"]
    assert entries["good.jpg"]["ok"] and entries["good.jpg"]["points"] == 2
    assert "corrupt.jpg" in entries["corrupt.jpg"]["error"] and not entries["corrupt.jpg"]["ok"]
    assert entries["missing.jpg"] == {"ok": False, "error": f"{tmp_path / 'missing.jpg'}: file not found"}
    assert "outside the allowed data roots" in entries[f"../{outside.name}/far.jpg"]["error"]
    assert summary.counts()["failed"] == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["_summary.json", "good.jpg.featurevector"]
    # The shell: exit 1, failures named on stdout, no traceback.
    code = main(
        [
            "bulk",
            "extract",
            "--weights",
            str(make_survey_weights()),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "out2"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in out + err
    assert "2 of 4 images ok" in out and f"  missing.jpg: {tmp_path / 'missing.jpg'}: file not found" in out


def make_survey_weights():
    from spacer_core.weights.synthetic import cached_weights

    return cached_weights().path


@pytest.mark.slow
def test_names_on_s3_and_http_are_read_through_storage(tmp_path, s3_bucket, http_server):  # noqa: F811
    write_image(tmp_path / "a.jpg", 1)
    write_image(tmp_path / "b.jpg", 2)
    write_image(tmp_path / "c.jpg", 3)
    boto3.client("s3").upload_file(str(tmp_path / "b.jpg"), s3_bucket, "survey/b.jpg")
    url = http_server.add("/img/c.jpg", (tmp_path / "c.jpg").read_bytes())
    points = [(10, 20), (200, 300)]
    manifest = write_manifest(
        tmp_path / "m.csv",
        {
            "a.jpg": points,
            f"s3://{s3_bucket}/survey/b.jpg": points,
            url: points,
            f"s3://{s3_bucket}/nope.jpg": points,
        },
    )
    task = bulk.BulkTask.extract(weights_extractor(make_survey_weights()), tmp_path / "out")
    summary = bulk.run(task, bulk.plan(manifest))
    assert summary.counts()["ok"] == 3
    assert "no such object" in summary.outcomes[f"s3://{s3_bucket}/nope.jpg"].error
    # Same bytes wherever they were read from: the same features.
    local = bulk.BulkTask.extract(task.extractor, tmp_path / "local")
    bulk.run(local, bulk.plan(write_manifest(tmp_path / "l.csv", {"b.jpg": points, "c.jpg": points})))
    for name in ("b.jpg", "c.jpg"):
        np.testing.assert_array_equal(
            read_features(tmp_path / "out" / f"{name}.featurevector")[1],
            read_features(tmp_path / "local" / f"{name}.featurevector")[1],
        )


def test_rerun_skips_done_images_and_overwrite_redoes_them(survey, tmp_path):
    extractor = weights_extractor(survey.weights)
    items = bulk.plan(survey.manifest)
    out = tmp_path / "f"
    first = bulk.run(bulk.BulkTask.extract(extractor, out), items[:3])
    assert first.counts()["points_computed"] == 24
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.featurevector")}
    seen = []
    second = bulk.run(bulk.BulkTask.extract(extractor, out), items, progress=lambda *a: seen.append(a))
    assert (second.counts()["skipped"], second.counts()["points_computed"]) == (3, 24)
    assert seen[0] == (3, 6, 24) and seen[-1] == (6, 6, 48)
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    third = bulk.run(bulk.BulkTask.extract(extractor, out, overwrite=True), items[:1])
    assert third.counts()["skipped"] == 0
    redone = f"{items[0].file_name}.featurevector"
    assert (out / redone).stat().st_mtime_ns != stamps[redone]


@pytest.mark.slow
def test_classify_writes_the_results_csv_from_the_pipeline_scores(survey, tmp_path, capsys):
    results = tmp_path / "results.csv"
    code = main(
        [
            "bulk",
            "classify",
            "--weights",
            str(survey.weights),
            "--classifier",
            str(survey.classifier),
            "--manifest",
            str(survey.manifest),
            "--out",
            str(results),
            "--threshold",
            "0.5",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["results"] == str(results) and report["points"] == 48
    with open(results, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:6] == ["Name", "Row", "Column", "Label", "Score", "Accepted"]
    # CoralNet knows the image by its file name, not by the manifest's path to it.
    assert [t["Name"] for t in table[:8]] == [survey.images[0].name] * 8
    # The scores are the classifier's on the image's features (extracted here by the local engine).
    bulk.run(
        bulk.BulkTask.extract(weights_extractor(survey.weights), tmp_path / "f"), bulk.plan(survey.manifest)
    )
    rowcols, feats = read_features(tmp_path / "f" / f"{survey.images[0].name}.featurevector")
    probs = load_classifier(DataLocation("filesystem", str(survey.classifier))).predict_proba(feats)
    for t, (r, c), p in zip(table, rowcols, probs):
        assert (int(t["Row"]), int(t["Column"])) == (r, c)
        assert float(t["Score"]) == pytest.approx(p.max(), abs=1e-4)
        assert (t["Accepted"] == "yes") == (float(t["Score"]) >= 0.5)
        assert t["Label"] == (t["Machine suggestion 1"] if t["Accepted"] == "yes" else "")
    # A rerun with another threshold scores nothing again and rewrites the CSV from the parts.
    parts = tmp_path / "results.csv.parts"
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.iterdir() if p.name != "_summary.json"}
    assert len(stamps) == 6
    assert (
        main(
            [
                "bulk",
                "classify",
                "--weights",
                str(survey.weights),
                "--classifier",
                str(survey.classifier),
                "--manifest",
                str(survey.manifest),
                "--out",
                str(results),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    assert {n: (parts / n).stat().st_mtime_ns for n in stamps} == stamps
    with open(results, newline="") as f:
        assert all(t["Accepted"] == "yes" for t in csv.DictReader(f))
    shutil.rmtree(parts)


def test_bad_shell_arguments_give_one_line(survey, tmp_path, capsys):
    code = main(
        [
            "bulk",
            "extract",
            "--weights",
            str(survey.weights),
            "--manifest",
            str(tmp_path / "none.csv"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err == f"spacer bulk: {tmp_path / 'none.csv'}: no such file\n"
    code = main(
        [
            "bulk",
            "extract",
            "--weights",
            str(survey.weights),
            "--manifest",
            str(survey.manifest),
            "--out",
            str(tmp_path / "o"),
            "--shard",
            "4/4",
        ]
    )
    assert code == 1 and "--shard '4/4': expected I/N" in capsys.readouterr().err


def _bulk_job(env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BULK_", "AWS_BATCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "spacer_core.mailman", "bulk_job"],
        env={**env, **env_extra},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_aws_batch_array_children_each_take_their_shard_of_the_manifest(survey, tmp_path):
    common = {
        "BULK_TASK": "classify",
        "BULK_WEIGHTS": str(survey.weights),
        "BULK_MANIFEST": str(survey.manifest),
        "BULK_OUT": str(tmp_path / "results.csv"),
        "BULK_CLASSIFIER": str(survey.classifier),
        "AWS_BATCH_JOB_ARRAY_SIZE": "2",
    }
    for index in range(2):
        proc = _bulk_job({**common, "AWS_BATCH_JOB_ARRAY_INDEX": str(index)}, tmp_path)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(
            (
                tmp_path / f"results.shard-{index}-of-2.csv.parts" / f"_summary.shard-{index}-of-2.json"
            ).read_text()
        )
        assert list(summary["outputs"]) == [f"images/{p.name}" for p in survey.images[index::2]]
        with open(tmp_path / f"results.shard-{index}-of-2.csv", newline="") as f:
            names = {row["Name"] for row in csv.DictReader(f)}
        # The results name each image as CoralNet does, by its file name.
        assert names == {p.name for p in survey.images[index::2]}
    # Extraction shards share one folder; each keeps its own summary.
    common.update(BULK_TASK="extract", BULK_OUT=str(tmp_path / "features"), BULK_SHARDS="3")
    for index in range(3):
        assert _bulk_job({**common, "AWS_BATCH_JOB_ARRAY_INDEX": str(index)}, tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted(
        [f"_summary.shard-{i}-of-3.json" for i in range(3)]
        + [f"{p.name}.featurevector" for p in survey.images]
    )
    proc = _bulk_job({**common, "AWS_BATCH_JOB_ARRAY_INDEX": "3"}, tmp_path)
    assert proc.returncode == 1 and "array index 3 with 3 shards" in proc.stderr


def _scores(results: Path) -> list[tuple[str, str, str, str]]:
    with open(results, newline="") as f:
        return [(t["Name"], t["Row"], t["Column"], t["Score"]) for t in csv.DictReader(f)]


def test_classify_rerun_scores_again_when_the_classifier_or_weights_change(tmp_path):
    s = make_survey(tmp_path / "s", images=2, points=4)
    extractor = weights_extractor(s.weights)
    items = bulk.plan(s.manifest)
    out = tmp_path / "results.csv"

    def classify(classifier: Path, **options) -> bulk.Summary:
        task = bulk.BulkTask.classify(
            extractor, DataLocation("filesystem", str(classifier)), out, 0.5, **options
        )
        return bulk.run(task, items)

    first = classify(s.classifier)
    assert first.counts()["points_computed"] == 8
    scores_a = _scores(out)
    assert classify(s.classifier).counts()["skipped"] == 2
    # Another classifier at another path: every image is scored again, with its scores.
    other = write_classifier(tmp_path / "other.pkl", seed=1)
    again = classify(other)
    assert (again.counts()["skipped"], again.counts()["points_computed"]) == (0, 8)
    scores_b = _scores(out)
    assert scores_b != scores_a
    # The same path rewritten (a retrained classifier) is another classifier too.
    assert classify(s.classifier).counts()["skipped"] == 0
    assert _scores(out) == scores_a
    shutil.copyfile(other, s.classifier)
    rewritten = classify(s.classifier)
    assert (rewritten.counts()["skipped"], rewritten.counts()["points_computed"]) == (0, 8)
    assert _scores(out) == scores_b
    # A part scored with other weights is not done.
    part = Path(str(out) + ".parts") / f"{items[0].file_name}{bulk.SCORES_SUFFIX}"
    data = json.loads(part.read_text())
    assert data["source"]["weights_sha256"] == extractor.feature_provenance([], []).weights_sha256
    data["source"]["weights_sha256"] = "0" * 64
    part.write_text(json.dumps(data))
    mixed = classify(s.classifier)
    assert (mixed.counts()["skipped"], mixed.counts()["points_computed"]) == (1, 4)
    assert _scores(out) == scores_b


def test_a_failed_image_leaves_no_part_a_rerun_could_reuse(tmp_path):
    s = make_survey(tmp_path / "s", images=2, points=4)
    extractor = weights_extractor(s.weights)
    items = bulk.plan(s.manifest)
    out = tmp_path / "results.csv"
    task = bulk.BulkTask.classify(extractor, DataLocation("filesystem", str(s.classifier)), out, 0.5)
    assert bulk.run(task, items).counts()["ok"] == 2
    part = Path(str(out) + ".parts") / f"{items[1].file_name}{bulk.SCORES_SUFFIX}"
    assert part.exists()
    s.images[1].write_bytes(b"not a JPEG")
    redo = bulk.run(bulk.BulkTask.classify(extractor, task.classifier, out, 0.5, overwrite=True), items)
    assert (redo.counts()["ok"], redo.counts()["failed"]) == (1, 1)
    assert not part.exists()
    # A plain rerun tries the image again instead of rebuilding its rows from the old scores.
    rerun = bulk.run(task, items)
    assert (rerun.counts()["skipped"], rerun.counts()["failed"]) == (1, 1)
    assert {name for name, *_ in _scores(out)} == {items[0].file_name}


def test_classify_keeps_the_labels_a_person_gave_in_the_manifest(tmp_path, capsys):
    s = make_survey(tmp_path / "s", images=2, points=4)
    items = bulk.plan(s.manifest)
    given = {
        (items[0].file_name, *items[0].rowcols[1]): "PERSON",
        (items[1].file_name, *items[1].rowcols[3]): "SAND",
    }
    lines = ["Name,Row,Column,Label"] + [
        f"{i.name},{r},{c},{given.get((i.file_name, r, c), '')}" for i in items for r, c in i.rowcols
    ]
    labelled = s.folder / "labelled.csv"
    labelled.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.csv"
    args = ["bulk", "classify", "--weights", str(s.weights), "--classifier", str(s.classifier)]
    code = main([*args, "--manifest", str(labelled), "--out", str(results), "--threshold", "0"])
    assert code == 0
    capsys.readouterr()
    with open(results, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8
    for t in table:
        point = (t["Name"], int(t["Row"]), int(t["Column"]))
        if point in given:
            assert (t["Label"], t["Accepted"]) == (given[point], "person")
        else:
            # Threshold 0 accepts every machine suggestion.
            assert (t["Label"], t["Accepted"]) == (t["Machine suggestion 1"], "yes")
