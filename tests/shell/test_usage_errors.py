"""Usage errors of the `spacer` command: exit 2 and the usage of the command at fault."""

from __future__ import annotations

import pytest

from shell.main import main


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["extract", "--points", "random:3", "--out", "x", "--images", "imgs"], "missing --weights"),
        (["extract", "--weights", "w.pt", "--out", "x", "a.jpg"], "missing --points"),
        (["extract", "--weights", "w.pt", "--points", "grid:2x2", "a.jpg"], "missing --out"),
        (
            ["classify", "--weights", "w.pt", "--points", "random:3", "--out", "r.csv", "a.jpg"],
            "missing --classifier",
        ),
        (
            ["classify", "--weights", "w.pt", "--classifier", "c.pkl", "--out", "r.csv", "a.jpg"],
            "missing --points",
        ),
        (["train", "--annotations", "a.csv"], "missing --features, --out"),
        (["evaluate", "--features", "f"], "missing --classifier, --annotations"),
        (["bulk", "extract", "--weights", "w.pt"], "the following arguments are required: --manifest"),
    ],
)
def test_a_missing_required_option_is_a_usage_error(argv, missing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    command = " ".join(argv[:2] if argv[0] == "bulk" else argv[:1])
    assert info.value.code == 2
    assert err.startswith(f"usage: spacer {command} ") and f"spacer {command}: error: {missing}" in err
