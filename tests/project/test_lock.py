"""constraints.txt pins the whole test environment, and scripts/lock.py reads and reports it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lock"] = module
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _makefile_pyspacer() -> str:
    match = re.search(r"^PYSPACER := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: no PYSPACER := line"
    return match[1]


def test_every_requirement_of_pyproject_is_pinned_within_its_range():
    """Fails when a dependency is added or its range moves without `make lock`."""
    pins = lock.read_pins()
    unpinned, outside = [], []
    for text in [*lock.requirements(build=True), _makefile_pyspacer()]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pin = pins.get(lock.normalize(req.name))
        if pin is None:
            unpinned.append(req.name)
        elif not req.specifier.contains(Version(pin[1]), prereleases=True):
            outside.append(f"{req.name}=={pin[1]} is not {req.specifier}")
    assert unpinned == [] and outside == [], "run `make lock`"


def test_the_lock_pins_transitive_packages_but_not_the_project_itself():
    pins = lock.read_pins()
    direct = {lock.normalize(Requirement(r).name) for r in lock.requirements(build=True)}
    assert len(pins) > len(direct) + 20
    assert {"grpcio", "torch", "maturin", "pyspacer", "protobuf", "typing-extensions"} <= pins.keys()
    assert "spacer-server" not in pins and "pip" not in pins


def test_requirements_lists_the_named_extras_and_the_build_backend():
    base = lock.requirements([])
    with_test = lock.requirements(["test"])
    assert any(r.startswith("torch") for r in base)
    assert not any(r.startswith("pytest") for r in base)
    assert any(r.startswith("pytest") for r in with_test)
    assert lock.requirements([], build=True)[-1].startswith("maturin")
    with pytest.raises(SystemExit, match="no such extra in pyproject.toml: nope"):
        lock.requirements(["nope"])


def test_requirements_command_feeds_pip(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/lock.py"), "requirements", "--build", "ray"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == lock.requirements(["ray"], build=True)
    for line in out:
        Requirement(line)  # each line is one valid requirement


def test_read_pins_rejects_anything_but_exact_pins(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# a comment\n\nNumPy==2.0.1  # trailing\nfoo_bar==1\n")
    assert lock.read_pins(path) == {"numpy": ("NumPy", "2.0.1"), "foo-bar": ("foo_bar", "1")}
    path.write_text("numpy>=2\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:1: not a `name==version` pin: 'numpy>=2'"):
        lock.read_pins(path)


@pytest.mark.slow
def test_moved_names_each_package_whose_installed_version_differs(tmp_path):
    import pytest as installed_pytest

    path = tmp_path / "constraints.txt"
    path.write_text(f"pytest==0.0.1\npluggy=={lock.installed()['pluggy'][1]}\nnot-installed-here==1.0\n")
    lines = lock.moved(lock.read_pins(path), lock.installed())
    assert f"pytest: 0.0.1 -> {installed_pytest.__version__}" in lines
    assert not any(line.startswith("pluggy:") for line in lines)
    assert not any("not-installed-here" in line for line in lines)
    assert any(line.endswith("(not pinned) -> " + lock.installed()["packaging"][1]) for line in lines)
