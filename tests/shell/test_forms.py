"""The message form versus the CSV form, decided once, and how each words a failure.

`--message FILE` is the explicit message form; one positional `.json` (or
`-`) is its older spelling. A local CSV run's failures speak of files, never
of gRPC status codes; the message form keeps the code a server would answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from server.errors import status_for
from shell import errors
from shell.main import build_parser, choose_form, main
from spacer_core import crop
from spacer_core import exceptions as spacer_exc
from spacer_core.data_classes import DataLocation, ImageFeatures, PointFeatures
from spacer_core.messages import ClassifyFeaturesMsg
from spacer_core.testing import make_classifier

ROOT = Path(__file__).resolve().parents[2]
STATUS_NAMES = [code.name for code in grpc.StatusCode]


def parsed(*argv: str):
    args = build_parser().parse_args(list(argv))
    choose_form(args)
    return args


@pytest.mark.parametrize(
    "argv, message, inputs",
    [
        (["extract", "msg.json"], "msg.json", []),
        (["classify", "-"], "-", []),
        (["train", "MSG.JSON"], "MSG.JSON", []),
        (["classify", "--message", "m.json"], "m.json", []),
        (["extract", "--message", "-"], "-", []),
        (["extract", "a.jpg"], None, ["a.jpg"]),
        (["classify", "a.jpg", "b.json"], None, ["a.jpg", "b.json"]),
        (["extract", "a.json", "b.json"], None, ["a.json", "b.json"]),
        (["train", "--annotations", "a.csv"], None, []),
    ],
)
def test_the_form_is_decided_in_one_place(argv, message, inputs):
    args = parsed(*argv)
    assert (args.message, args.inputs) == (message, inputs)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["classify", "--message", "m.json", "--weights", "w.pt"], "--weights"),
        (["classify", "m.json", "--classifier", "c.pkl"], "--classifier"),
        (["extract", "--message", "m.json", "a.jpg"], "a.jpg"),
        (["train", "a.png"], "a.png"),
    ],
)
def test_a_message_mixed_with_the_csv_form_is_a_usage_error(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and fragment in err and "Traceback" not in err


def test_log_level_is_declared_once_and_checked():
    for argv in (
        ["extract"],
        ["evaluate"],
        ["demo"],
        ["bulk", "extract", "--weights", "w", "--manifest", "m", "-o", "o"],
    ):
        assert build_parser().parse_args([*argv, "--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--log-level", "loud"])


def _features_message(tmp_path: Path) -> ClassifyFeaturesMsg:
    rng = np.random.default_rng(4)
    features = ImageFeatures(
        [PointFeatures(r, c, rng.normal(size=1280)) for r, c in [(1, 2), (3, 4)]], True, 1280, 2
    )
    features.store(DataLocation("filesystem", str(tmp_path / "a.featurevector")))
    make_classifier(tmp_path / "clf.pkl")
    return ClassifyFeaturesMsg(
        "forms-1",
        DataLocation("filesystem", str(tmp_path / "a.featurevector")),
        DataLocation("filesystem", str(tmp_path / "clf.pkl")),
    )


def test_message_flag_and_legacy_positional_give_the_same_return(tmp_path, capsys):
    msg = _features_message(tmp_path)
    path = tmp_path / "classify.msg"  # --message needs no .json suffix
    path.write_text(json.dumps(msg.serialize()))
    assert main(["classify", "--message", str(path), "-o", str(tmp_path / "out.json")]) == 0
    explicit = json.loads((tmp_path / "out.json").read_text())
    legacy_path = tmp_path / "classify.json"
    legacy_path.write_text(path.read_text())
    capsys.readouterr()
    assert main(["classify", str(legacy_path)]) == 0
    legacy = json.loads(capsys.readouterr().out)
    assert explicit["classes"] == legacy["classes"] and len(explicit["scores"]) == 2
    assert explicit["scores"] == legacy["scores"]


def test_message_from_stdin_through_python_m_shell(tmp_path):
    msg = _features_message(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "shell", "classify", "--message", "-"],
        cwd=ROOT,
        input=json.dumps(msg.serialize()),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["scores"]) == 2


def test_message_errors_keep_their_code_and_name_the_file(tmp_path, capsys):
    missing = tmp_path / "absent.json"
    assert main(["classify", "--message", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"spacer classify: NOT_FOUND: {missing}: no such message file\n"
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["train", "--message", str(tmp_path / "list.json")]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "list.json" in err and "expected a JSON object" in err
    (tmp_path / "partial.json").write_text('{"job_token": "x"}')
    assert main(["extract", str(tmp_path / "partial.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("spacer extract: INVALID_ARGUMENT: ") and "partial.json" in err
    assert "ExtractFeaturesMsg" in err and err.count("\n") == 1


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shell", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_local_csv_failures_name_files_and_no_status_codes(tmp_path, efficientnet_weights):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 30), "gray").save(tmp_path / "ok.png")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    (tmp_path / "ann.csv").write_text("Name,Row,Column,Label\nok.png,1,1,A\n")
    weights = str(efficientnet_weights.path)
    cases = [
        # An undecodable image (an input error in the library).
        (
            (
                "extract",
                "--weights",
                weights,
                "--points",
                "random:3",
                "--out",
                tmp_path / "f",
                tmp_path / "bad.jpg",
            ),
            "bad.jpg",
        ),
        # Weights that are not weights (a precondition).
        (
            (
                "extract",
                "--weights",
                tmp_path / "junk.pt",
                "--points",
                "random:3",
                "--out",
                tmp_path / "f",
                tmp_path / "ok.png",
            ),
            "junk.pt",
        ),
        # A classifier that does not exist (data not found).
        (
            (
                "classify",
                "--weights",
                weights,
                "--classifier",
                tmp_path / "none.pkl",
                "--points",
                "random:3",
                "--out",
                tmp_path / "r.csv",
                tmp_path / "ok.png",
            ),
            "none.pkl",
        ),
        # Features never extracted.
        (
            (
                "train",
                "--annotations",
                tmp_path / "ann.csv",
                "--features",
                tmp_path / "nowhere",
                "--out",
                tmp_path / "c.pkl",
            ),
            "nowhere",
        ),
    ]
    for argv, names in cases:
        result = _run(*map(str, argv))
        where = f"{argv[0]} ... {names}: {result.stderr!r}"
        assert result.returncode == 1, where
        assert result.stderr.startswith(f"spacer {argv[0]}: ") and result.stderr.count("\n") == 1, where
        assert names in result.stderr and "Traceback" not in result.stderr, where
        assert not any(name in result.stderr for name in STATUS_NAMES), where


@pytest.mark.parametrize(
    "exc",
    [
        spacer_exc.StorageFileNotFoundError("gone"),
        spacer_exc.URLRefusedError("u", ValueError("private address")),
        spacer_exc.DataLimitError("big"),
        spacer_exc.HashMismatchError("hash"),
        spacer_exc.ImageError("img"),
        spacer_exc.StorageUnavailableError("down"),
        spacer_exc.DeadlineExceededError("late"),
        crop.ImageDecodeError("dec"),
    ],
)
def test_message_codes_agree_with_the_server(exc):
    expected = status_for(exc)
    assert expected is not None
    assert errors.error_code(exc) == expected[0].name
    assert errors.describe(exc) == str(exc)


def test_console_script_and_maturin_packages_name_the_shell():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["spacer"] == "shell.main:console"
    assert "shell" in project["tool"]["maturin"]["python-packages"]


def test_python_m_server_points_to_the_shell():
    result = _run_module("server")
    assert result.returncode == 2 and "python -m shell" in result.stderr


def _run_module(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", name, "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# Runs `spacer ARGS...` with HOOK=module:function made slow: it says so on stderr, waits HOOK_SECONDS (2), then works.
_SLOW_HOOK = """
import importlib, os, sys, time
module_name, name = os.environ["HOOK"].split(":")
module = importlib.import_module(module_name)
original = getattr(module, name)

def slow(*args, **kwargs):
    print("hook: working", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("HOOK_SECONDS", "2")))
    return original(*args, **kwargs)

setattr(module, name, slow)
from shell.main import main
sys.exit(main(sys.argv[1:]))
"""


def _interrupted(
    cwd: Path, hook: str, *argv: str, ctrl_c: int = 1, hook_seconds: float = 2
) -> tuple[int, str]:
    """Start the command, send `ctrl_c` SIGINTs once its slow hook runs; (exit status, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_HOOK, *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HOOK": hook, "HOOK_SECONDS": str(hook_seconds)},
    )
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("hook: working"):
                for k in range(ctrl_c):
                    time.sleep(0.5 if k else 0)  # apart, or the process may see one
                    proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail(f"the command ended before its work began: {''.join(seen)}")
        rest = proc.stderr.read()
        return proc.wait(timeout=300), "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["bulk", "classify"])
def test_ctrl_c_stops_with_one_line_and_status_130(tmp_path, command):
    from spacer_core.testing import make_survey

    s = make_survey(tmp_path, images=4, points=2, size=(96, 72))
    code, err = _interrupted(tmp_path, *_slowed(s, command))
    _assert_one_line_130(code, err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["bulk", "classify"])
def test_a_second_ctrl_c_does_not_wait_for_the_images_under_way(tmp_path, command):
    from spacer_core.testing import make_survey

    s = make_survey(tmp_path, images=4, points=2, size=(96, 72))
    # Each image now takes 20 minutes: after one Ctrl-C the command would wait for it, after two it must not.
    # (A reader that waits out the hook runs into the test's own timeout.)
    code, err = _interrupted(tmp_path, *_slowed(s, command, in_workers=True), ctrl_c=2, hook_seconds=1200)
    _assert_one_line_130(code, err)


# `spacer check-config`, then a slow interpreter shutdown (an atexit hook says when it starts).
_SLOW_EXIT = """
import atexit, sys, time

def slow_exit():
    print("hook: exiting", file=sys.stderr, flush=True)
    time.sleep(2)

atexit.register(slow_exit)
from shell.main import console
sys.argv[1:] = ["check-config"]
console()
"""


def test_a_ctrl_c_once_the_command_has_finished_leaves_its_status():
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_EXIT],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("hook: exiting"):
                proc.send_signal(signal.SIGINT)
                break
        err = "".join(seen) + proc.stderr.read()
        assert proc.wait(timeout=120) == 0, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _slowed(s, command: str, in_workers: bool = False) -> list[str]:
    """HOOK and the arguments of `command` on survey `s`, made slow: classify while it plans
    each image's points (in the main thread) unless `in_workers`, else each image's work."""
    images = "spacer_core.bulk.local:process_image"
    if command == "bulk":
        manifest = ["--weights", str(s.weights), "--manifest", str(s.manifest), "-o", "features"]
        return [images, "bulk", "extract", *manifest]
    argv = ["classify", "--weights", str(s.weights), "--classifier", str(s.classifier)]
    argv += ["--points", "random:2", "--images", "images", "-o", "results.csv"]
    return [images if in_workers else "spacer_core.survey.workflow:points_for", *argv]


def _assert_one_line_130(code: int, err: str) -> None:
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # Bulk may say how far it got and where its summary is; anything else says just that.
    last = err.strip().splitlines()[-1]
    assert last == "interrupted" or last.startswith("interrupted: "), err
