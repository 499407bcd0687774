"""spacer_core.config: sources and their precedence, casting, errors, check()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from spacer_core import config
from spacer_core.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Isolate config from the developer's environment; restore it afterwards."""
    saved = {
        name: getattr(config, name)
        for name in [*config.SETTINGS, "SECRETS", "SECRETS_PATH", "SETTINGS_FROM_DJANGO"]
    }
    saved_pixels = Image.MAX_IMAGE_PIXELS
    for name in list(os.environ):
        if name.startswith("SPACER_"):
            monkeypatch.delenv(name)
    # An explicit path that does not exist yet would be an error, so point at
    # an empty-object file; tests overwrite it as needed.
    secrets = tmp_path / "secrets.json"
    secrets.write_text("{}")
    monkeypatch.setenv("SPACER_SECRETS_PATH", str(secrets))
    yield secrets
    for name, value in saved.items():
        setattr(config, name, value)
    Image.MAX_IMAGE_PIXELS = saved_pixels


def test_defaults_without_any_source(fresh_config):
    config.reload()
    assert config.MAX_IMAGE_PIXELS == 10000 * 10000
    assert config.MAX_POINTS_PER_IMAGE == 1000
    assert config.TRAINING_BATCH_LABEL_COUNT == 5000
    assert config.LOG_LEVEL == "INFO"
    assert config.AWS_ANONYMOUS is False
    assert config.AWS_ENDPOINT_URL is None
    assert config.EXTRACTORS_CACHE_DIR is None


def test_env_beats_secrets_file(fresh_config, monkeypatch):
    fresh_config.write_text(json.dumps({"MAX_POINTS_PER_IMAGE": "20", "AWS_REGION": "eu-west-1"}))
    monkeypatch.setenv("SPACER_MAX_POINTS_PER_IMAGE", "30")
    config.reload()
    assert config.MAX_POINTS_PER_IMAGE == 30
    assert config.AWS_REGION == "eu-west-1"


def test_empty_env_value_counts_as_unset(fresh_config, monkeypatch):
    fresh_config.write_text(json.dumps({"AWS_REGION": "eu-west-1", "EXTRACTORS_CACHE_DIR": ""}))
    monkeypatch.setenv("SPACER_AWS_REGION", "")
    config.reload()
    assert config.AWS_REGION == "eu-west-1"
    assert config.EXTRACTORS_CACHE_DIR is None


def test_secrets_file_values_are_cast(fresh_config):
    fresh_config.write_text(
        json.dumps({"MAX_IMAGE_PIXELS": 400, "AWS_ANONYMOUS": "True", "TRAINING_BATCH_LABEL_COUNT": "77"})
    )
    config.reload()
    assert config.MAX_IMAGE_PIXELS == 400
    assert config.AWS_ANONYMOUS is True
    assert config.TRAINING_BATCH_LABEL_COUNT == 77


@pytest.mark.parametrize(("text", "expected"), [("True", True), ("False", False)])
def test_bool_text(fresh_config, monkeypatch, text, expected):
    monkeypatch.setenv("SPACER_AWS_ANONYMOUS", text)
    assert config.get_config_value("AWS_ANONYMOUS", value_type=bool, default=None) is expected


@pytest.mark.parametrize("text", ["true", "1", "yes", "FALSE"])
def test_other_bool_text_is_an_error_naming_the_key(fresh_config, monkeypatch, text):
    monkeypatch.setenv("SPACER_AWS_ANONYMOUS", text)
    with pytest.raises(ConfigError, match="AWS_ANONYMOUS may only be True or False"):
        config.reload()


def test_bad_int_is_an_error_naming_the_key(fresh_config, monkeypatch):
    monkeypatch.setenv("SPACER_MAX_POINTS_PER_IMAGE", "lots")
    with pytest.raises(ConfigError, match="MAX_POINTS_PER_IMAGE must be an integer"):
        config.reload()


def test_required_setting_missing(fresh_config):
    config.reload()
    with pytest.raises(
        ConfigError, match=r"SOME_REQUIRED_THING setting is required\. \(Debug info: Secrets file not found"
    ):
        config.get_config_value("SOME_REQUIRED_THING")


def test_explicit_secrets_path_must_exist(fresh_config, monkeypatch, tmp_path):
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("SPACER_SECRETS_PATH", str(missing))
    with pytest.raises(ConfigError, match="nope.json"):
        config.reload()


def test_secrets_file_must_be_a_json_object(fresh_config):
    fresh_config.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        config.reload()


def test_reload_sets_pillow_limits(fresh_config, monkeypatch):
    monkeypatch.setenv("SPACER_MAX_IMAGE_PIXELS", "5000")
    config.reload()
    # A margin above our own limit, so our DataLimitError fires first.
    assert Image.MAX_IMAGE_PIXELS == 5000 + 20000
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_check_masks_secrets(fresh_config, monkeypatch, capsys):
    monkeypatch.setenv("SPACER_AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    monkeypatch.setenv("SPACER_AWS_SECRET_ACCESS_KEY", "s3cr3t-s3cr3t-s3cr3t-s3cr3t")
    monkeypatch.setenv("SPACER_AWS_SESSION_TOKEN", "short")
    monkeypatch.setenv("SPACER_AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    config.reload()
    config.check()
    out = capsys.readouterr().out
    assert "AKIAABCDEFGHIJKLMNOP" not in out
    assert "s3cr3t-s3cr3t-s3cr3t-s3cr3t" not in out
    assert "short" not in out
    assert "AWS_ACCESS_KEY_ID: AKIA ... MNOP" in out
    assert "AWS_SESSION_TOKEN: *****" in out
    assert "AWS_ENDPOINT_URL: http://127.0.0.1:9000" in out
    assert "MAX_POINTS_PER_IMAGE: 1000" in out


def _run_python(code: str, env: dict[str, str]) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPACER_")}
    full_env.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_values_are_read_at_import(tmp_path):
    secrets = tmp_path / "s.json"
    secrets.write_text(json.dumps({"MAX_POINTS_PER_IMAGE": "12", "AWS_REGION": "ap-south-1"}))
    out = _run_python(
        """
        from spacer_core import config
        print(config.MAX_POINTS_PER_IMAGE, config.AWS_REGION, config.AWS_ENDPOINT_URL)
        """,
        {"SPACER_SECRETS_PATH": str(secrets), "SPACER_AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
    )
    assert out.split() == ["12", "ap-south-1", "http://127.0.0.1:1"]


def test_django_settings_used_when_no_secrets_file(tmp_path):
    pytest.importorskip("django", reason="Django is optional; install it to test the SPACER setting")
    if config.DEFAULT_SECRETS_PATH.exists():
        pytest.skip("a secrets.json beside the package takes precedence over Django")
    (tmp_path / "spacer_test_settings.py").write_text(
        "SECRET_KEY = 'x'\nSPACER = {'MAX_POINTS_PER_IMAGE': 33, 'AWS_REGION': 'sa-east-1', 'LOG_LEVEL': ''}\n"
    )
    out = _run_python(
        """
        from spacer_core import config
        print(config.MAX_POINTS_PER_IMAGE, config.AWS_REGION, config.LOG_LEVEL)
        print(config.get_config_detection_result())
        """,
        {
            "DJANGO_SETTINGS_MODULE": "spacer_test_settings",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
            # No explicit secrets file; the repository has none either.
            "SPACER_MAX_IMAGE_PIXELS": "",
        },
    )
    first, second = out.splitlines()
    assert first.split() == ["33", "sa-east-1", "INFO"]
    assert "SPACER Django setting found." in second
