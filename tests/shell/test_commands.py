"""`spacer` command line: settings from flags and SPACER_* variables, one-off tasks from JSON files."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.config import MIB, ServerConfig, config_from_args
from shell.main import build_parser
from shell.main import main as main_entry
from spacer_core.testing import extractor_json, make_classifier, make_image

spacer = pytest.importorskip("spacer")
from spacer import tasks as sp_tasks  # noqa: E402
from spacer.data_classes import DataLocation as SpLoc  # noqa: E402
from spacer.data_classes import ImageFeatures as SpFeatures  # noqa: E402
from spacer.data_classes import PointFeatures as SpPoint  # noqa: E402
from spacer.extractors import FeatureExtractor as SpExtractor  # noqa: E402
from spacer.messages import ClassifyFeaturesMsg, ExtractFeaturesMsg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, env or {})


def test_defaults_serve_loopback_50051():
    config = parse([])
    assert config.address == "127.0.0.1:50051"
    assert (config.device, config.precision, config.data_roots) == ("auto", "exact", ())
    assert config.max_message_bytes == 64 * MIB


def test_environment_then_flags(tmp_path):
    env = {
        "SPACER_PORT": "6001",
        "SPACER_DEVICE": "cpu",
        "SPACER_BATCH_SIZE": "8",
        "SPACER_MAX_MESSAGE_MB": "128",
        "SPACER_DATA_ROOTS": f"{tmp_path}{os.pathsep}/srv/images",
        "SPACER_BATCHING": "false",
        "SPACER_LOG_LEVEL": "debug",
        "SPACER_WORKERS": "",
    }
    config = parse([], env)
    assert (config.port, config.device, config.batch_size, config.batching) == (6001, "cpu", 8, False)
    assert config.max_message_bytes == 128 * MIB
    assert config.data_roots == (tmp_path.resolve(), Path("/srv/images"))
    assert config.log_level == "DEBUG"
    assert config.workers == ServerConfig().workers  # empty string = unset
    flagged = parse(["--port", "7000", "--address", "0.0.0.0:1234", "--data-root", str(tmp_path)], env)
    assert (flagged.host, flagged.port) == ("0.0.0.0", 7000)
    assert flagged.data_roots == (tmp_path.resolve(),)


def test_policy_flags_and_variables(tmp_path):
    from spacer_core.data_classes import DataLocation
    from spacer_core.exceptions import AccessDeniedError

    config = parse(["--allow-private-urls", "--s3-bucket", "a", "--s3-bucket", "b"])
    assert (config.allow_private_urls, config.s3_buckets, config.allow_any_path) == (True, ("a", "b"), False)
    policy = config.storage_policy()
    assert policy.url_rules is not None and policy.url_rules.allow_private
    policy.check(DataLocation("s3", "k", "a"), "read")
    with pytest.raises(AccessDeniedError, match="'c'"):
        policy.check(DataLocation("s3", "k", "c"), "read")
    env = parse([], {"SPACER_ALLOW_ANY_PATH": "true", "SPACER_S3_BUCKETS": "x,y"})
    assert (env.allow_any_path, env.s3_buckets, env.effective_data_roots()) == (True, ("x", "y"), None)
    env.storage_policy().check(DataLocation("filesystem", "/etc/hostname"), "read")
    assert parse([]).storage_policy().url_rules.allow_private is False  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="contradict"):
        parse(["--allow-any-path", "--data-root", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        (["--precision", "half"], {}, "precision"),
        (["--port", "70000"], {}, "port"),
        ([], {"SPACER_BATCH_SIZE": "lots"}, "SPACER_BATCH_SIZE"),
        (["--address", "nohostport"], {}, "host:port"),
        (["--workers", "0"], {}, "workers"),
    ],
)
def test_bad_settings_name_the_setting(argv, env, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse(argv, env)


@pytest.mark.parametrize(
    "argv, env, start",
    [
        (
            ["--fast-recheck-margin", "nan"],
            {},
            "--fast-recheck-margin: fast recheck margin must be in [0, 1], got nan",
        ),
        ([], {"SPACER_FAST_RECHECK_MARGIN": "2"}, "SPACER_FAST_RECHECK_MARGIN / --fast-recheck-margin: "),
        (["--port", "70000"], {}, "--port: port must be in 0..65535"),
        ([], {"SPACER_ADDRESS": "localhost:99999"}, "SPACER_ADDRESS / --address: port must be in"),
        (["--metrics-port", "-1"], {}, "--metrics-port: "),
        (["--device", "tpu"], {}, "--device: device must be one of"),
        ([], {"SPACER_PRECISION": "half"}, "SPACER_PRECISION / --precision: precision must be one of"),
        (["--batch-size", "0"], {}, "--batch-size: batch_size must be in 1..256, got 0"),
        (
            [],
            {"SPACER_BATCH_SIZE": "100000"},
            "SPACER_BATCH_SIZE / --batch-size: batch_size must be in 1..256",
        ),
        (
            [],
            {"SPACER_MAX_MESSAGE_MB": "0"},
            "SPACER_MAX_MESSAGE_MB / --max-message-mb: max_message_bytes must be",
        ),
        (["--grace", "-1"], {}, "--grace: grace_seconds must be a finite number >= 0"),
        (["--queue-delay-ms", "nan"], {}, "--queue-delay-ms: queue_delay_ms must be a finite number >= 0"),
        (
            [],
            {"SPACER_URL_TIMEOUT": "nan"},
            "SPACER_URL_TIMEOUT / --url-timeout: url_timeout_seconds must be",
        ),
        (
            ["--max-message-mb", "nan"],
            {},
            "--max-message-mb: max_message_bytes must be a finite number of MiB",
        ),
        (["--url-max-mb", "inf"], {}, "--url-max-mb: url_max_bytes must be a finite number of MiB"),
        (
            ["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
            {},
            "--tls-cert: tls_cert: no such file",
        ),
        (["--s3-bucket", "a/b"], {}, "--s3-bucket: s3 bucket must be a bucket name"),
    ],
)
def test_an_out_of_range_setting_names_its_flag_and_variable(argv, env, start):
    with pytest.raises(ValueError) as caught:
        parse(argv, env)
    assert str(caught.value).startswith(start)


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_an_out_of_range_flag_shows_its_commands_usage(command, capsys):
    with pytest.raises(SystemExit) as info:
        main_entry([command, "--fast-recheck-margin", "nan"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(f"usage: spacer {command} ")
    assert (
        f"spacer {command}: error: --fast-recheck-margin: fast recheck margin must be in [0, 1], got nan"
        in err
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shell", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.mark.slow
def test_check_config_prints_effective_settings():
    result = run_cli("check-config", "--port", "6123", env={"SPACER_PRECISION": "fast"})
    assert result.returncode == 0, result.stderr
    head = result.stdout[: result.stdout.index("spacer_core settings:")]
    server = json.loads(head)["server"]
    # No --data-root: confined to the working directory it started in.
    assert (server["port"], server["precision"], server["data_roots"]) == (6123, "fast", [str(ROOT)])
    assert "MAX_POINTS_PER_IMAGE" in result.stdout
    # Whether `fast` can run bf16 on this CPU, or runs exact and why.
    assert "fast precision on CPU:" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("spacer") is None, reason="console script not installed")
def test_console_script_entry_point():
    result = subprocess.run(["spacer", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout and "check-config" in result.stdout


def fs(path) -> SpLoc:
    return SpLoc("filesystem", str(path))


@pytest.mark.slow
def test_classify_subcommand_matches_pyspacer_on_a_features_message(tmp_path):
    rng = np.random.default_rng(1)
    features = SpFeatures([SpPoint(r, c, rng.normal(size=1280)) for r, c in [(1, 2), (3, 4)]], True, 1280, 2)
    features.store(fs(tmp_path / "a.featurevector"))
    make_classifier(tmp_path / "clf.pkl")
    msg = ClassifyFeaturesMsg("cli-1", fs(tmp_path / "a.featurevector"), fs(tmp_path / "clf.pkl"))
    (tmp_path / "msg.json").write_text(json.dumps(msg.serialize()))

    result = run_cli("classify", str(tmp_path / "msg.json"))
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    oracle = sp_tasks.classify_features(msg)
    assert ours["classes"] == oracle.classes
    np.testing.assert_allclose([s for _, _, s in ours["scores"]], [s for _, _, s in oracle.scores], atol=1e-4)

    stdin_result = run_cli(
        "classify", "-", "-o", str(tmp_path / "out" / "res.json"), stdin=json.dumps(msg.serialize())
    )
    assert stdin_result.returncode == 0, stdin_result.stderr
    assert json.loads((tmp_path / "out" / "res.json").read_text())["classes"] == oracle.classes


@pytest.mark.slow
def test_extract_subcommand_writes_pyspacer_features(tmp_path, efficientnet_weights):  # noqa: F811
    image = make_image(tmp_path / "img.png", 50, 40, seed=3)
    extractor = SpExtractor.deserialize(
        extractor_json(efficientnet_weights.path, efficientnet_weights.sha256)
    )
    msg = ExtractFeaturesMsg("cli-2", extractor, [(5, 5), (30, 45)], fs(image), fs(tmp_path / "ours.fv"))
    (tmp_path / "msg.json").write_text(json.dumps(msg.serialize()))
    result = run_cli("extract", str(tmp_path / "msg.json"), "-o", str(tmp_path / "ret.json"))
    assert result.returncode == 0, result.stderr
    assert set(json.loads((tmp_path / "ret.json").read_text())) >= {"runtime", "extractor_loaded_remotely"}
    oracle_msg = ExtractFeaturesMsg("o", extractor, [(5, 5), (30, 45)], fs(image), fs(tmp_path / "oracle.fv"))
    sp_tasks.extract_features(oracle_msg)
    ours = SpFeatures.load(fs(tmp_path / "ours.fv"))
    oracle = SpFeatures.load(fs(tmp_path / "oracle.fv"))
    for a, b in zip(ours.point_features, oracle.point_features):
        assert (a.row, a.col) == (b.row, b.col)
        np.testing.assert_allclose(a.data, b.data, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_train_subcommand_trains_and_stores(tmp_path):
    from spacer.data_classes import ImageLabels
    from spacer.messages import TrainClassifierMsg, TrainingTaskLabels

    rng = np.random.default_rng(2)
    data = {}
    for i in range(12):
        rowcols = [(int(r), int(c)) for r, c in rng.integers(0, 200, (8, 2))]
        SpFeatures([SpPoint(r, c, rng.normal(size=32)) for r, c in rowcols], True, 32, 8).store(
            fs(tmp_path / f"{i}.fv")
        )
        data[fs(tmp_path / f"{i}.fv")] = [(r, c, int(rng.integers(1, 3))) for r, c in rowcols]
    items = list(data.items())
    msg = TrainClassifierMsg(
        job_token="cli-3",
        trainer="minibatch",
        nbr_epochs=3,
        clf_type="LR",
        labels=TrainingTaskLabels(
            ImageLabels(dict(items[:8])), ImageLabels(dict(items[8:10])), ImageLabels(dict(items[10:]))
        ),
        previous_model_locs=[],
        model_loc=fs(tmp_path / "model.pkl"),
        valresult_loc=fs(tmp_path / "val.json"),
    )
    (tmp_path / "msg.json").write_text(json.dumps(msg.serialize()))
    result = run_cli("train", str(tmp_path / "msg.json"))
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    assert (tmp_path / "model.pkl").exists() and (tmp_path / "val.json").exists()
    oracle = sp_tasks.train_classifier(msg)
    assert ours["acc"] == pytest.approx(oracle.acc, abs=0.01)
    assert len(ours["ref_accs"]) == 3


@pytest.mark.slow
def test_task_subcommand_errors_name_the_file_and_the_status(tmp_path):
    msg = ClassifyFeaturesMsg("cli-4", fs(tmp_path / "missing.fv"), fs(tmp_path / "clf.pkl"))
    (tmp_path / "msg.json").write_text(json.dumps(msg.serialize()))
    result = run_cli("classify", str(tmp_path / "msg.json"))
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "missing.fv" in result.stderr
    (tmp_path / "bad.json").write_text("{nope")
    result = run_cli("train", str(tmp_path / "bad.json"))
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "bad.json" in result.stderr


def test_a_model_repository_outside_the_data_roots_is_refused_at_start(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "models").mkdir(parents=True)
    elsewhere.mkdir()
    config = parse(["--data-root", str(root), "--model-repository", str(root / "models")])
    assert config.model_repository == root / "models"
    with pytest.raises(ValueError, match="outside the data roots"):
        parse(["--data-root", str(root), "--model-repository", str(elsewhere)])
    # A symlink inside the root that leads out is outside too.
    (root / "link").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="outside the data roots"):
        parse(["--data-root", str(root), "--model-repository", str(root / "link")])
    assert parse(["--allow-any-path", "--model-repository", str(elsewhere)]).model_repository == elsewhere


@pytest.mark.parametrize(
    "host, expected",
    [
        ("0.0.0.0", "127.0.0.1:50051"),
        ("::", "[::1]:50051"),
        ("127.0.0.1", "127.0.0.1:50051"),
        ("10.1.2.3", "10.1.2.3:50051"),
    ],
)
def test_the_demo_hint_names_an_address_a_local_client_can_dial(host, expected):
    from shell.serve import demo_command

    assert demo_command(parse(["--host", host, "--allow-any-path"])) == f"spacer demo --server {expected}"


def _help(*argv: str) -> None:
    """Print `spacer ARGV --help` (read it with capsys)."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_server_help_shows_every_default_and_variable(command, capsys):
    _help(command)
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--host HOST interface to listen on (default: 127.0.0.1) [SPACER_HOST]",
        "(default: 50051) [SPACER_PORT]",
        "(default: exact) [SPACER_PRECISION]",
        "(default: 64) [SPACER_MAX_MESSAGE_MB]",
        "(default: 512) [SPACER_MEMORY_BUDGET_MB]",
        "(default: true) [SPACER_BATCHING]",
        f"{ServerConfig().workers} here) [SPACER_WORKERS]",
        "(default: INFO) [SPACER_LOG_LEVEL]",
    ):
        assert shown in text
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        if action.dest != "help":
            assert "default" in action.help and "[SPACER_" in action.help, action.option_strings


def test_each_command_help_is_its_own(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    descriptions = {name: command.description for name, command in sub.choices.items()}
    assert all(descriptions.values()), [name for name, text in descriptions.items() if not text]
    assert len(set(descriptions.values())) == len(descriptions)
    outs = {}
    for name in ("extract", "classify", "train"):
        out = next(a for a in sub.choices[name]._actions if a.dest == "out")
        outs[name] = out.help
    # evaluate writes no file of its own (it prints, or --report writes a page): no -o/--out to misread.
    assert not any(a.dest == "out" for a in sub.choices["evaluate"]._actions)
    assert len(set(outs.values())) == len(outs)
    assert "classifier pickle" in outs["train"] and "features" not in outs["train"]
    assert "results CSV" in outs["classify"] and ".featurevector" in outs["extract"]
    _help("train")
    text = " ".join(capsys.readouterr().out.split())
    assert "Train a classifier" in text and "TrainClassifierMsg" in text
    assert "results CSV" not in text and "features folder" not in text


def test_health_takes_the_server_positionally_or_with_server(capsys):
    from shell.main import main
    from tests.support.grpc_server import running_server

    with running_server() as server:
        for argv in (
            ["health", server.address],
            ["health", "--server", server.address],
            ["health", server.address, "--server", server.address],
        ):
            assert main(argv) == 0, argv
            assert capsys.readouterr().out == f"{server.address}: SERVING\n"
        assert main(["health", "--server", server.address, "--service", "no.such.Service"]) == 1
        with pytest.raises(SystemExit) as info:
            main(["health", server.address, "--server", "127.0.0.1:1"])
        assert info.value.code == 2 and "two servers named" in capsys.readouterr().err
    assert main(["health", "--server", server.address, "--timeout", "1"]) == 1  # stopped: unreachable
    assert capsys.readouterr().err.startswith(f"{server.address}: ")
    _help("health")
    text = " ".join(capsys.readouterr().out.split())
    assert "--server ADDR" in text and "(default 127.0.0.1:50051)" in text
