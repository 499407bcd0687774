"""Run code written for pyspacer on this library: an opt-in `spacer` -> `spacer_core` import alias.

    import spacer_core.compat
    spacer_core.compat.install()
    from spacer.tasks import extract_features      # spacer_core.tasks

or, for an unchanged program:

    python -m spacer_core.compat program.py [args...]

`install()` puts a finder first on `sys.meta_path`, so `spacer` and each
module pyspacer 0.14.0 has (`PYSPACER_MODULES`) resolve to the same-named
module of spacer_core even where the real pyspacer is installed. pyspacer
0.5.0's module `spacer.extract_features` resolves to `spacer_core.extractors`
(`RENAMED`). The modules are spacer_core's own objects (not copies):
`spacer.tasks is spacer_core.tasks` once the alias is installed.

Only pyspacer's modules are aliased: this project's engine and workflow
modules (`spacer.runtime`, `spacer.bulk`, ...) are not pyspacer's API, and
importing them through the alias fails with ModuleNotFoundError naming the
module. (The alias hands out the real module objects, so an attribute of
`spacer` that spacer_core itself has already imported stays visible.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
from types import ModuleType

ALIAS = "spacer"
TARGET = "spacer_core"
# pyspacer 0.14.0's modules, as pkgutil walks the installed package: the
# frozen names the alias serves (tests/spacer_core/test_compat.py compares
# this list with the real pyspacer).
PYSPACER_MODULES = frozenset(
    {
        "spacer",
        "spacer.aws",
        "spacer.config",
        "spacer.data_classes",
        "spacer.exceptions",
        "spacer.extractors",
        "spacer.extractors.base",
        "spacer.extractors.efficientnet",
        "spacer.extractors.efficientnet_utils",
        "spacer.extractors.torch_extractors",
        "spacer.extractors.utils",
        "spacer.extractors.vgg16",
        "spacer.mailman",
        "spacer.messages",
        "spacer.storage",
        "spacer.task_utils",
        "spacer.tasks",
        "spacer.train_classifier",
        "spacer.train_utils",
    }
)
# Module paths of earlier pyspacer releases that moved or merged since.
RENAMED = {
    "spacer.extract_features": "spacer_core.extractors",  # pyspacer 0.5.0
}


def in_alias_namespace(fullname: str) -> bool:
    """Whether `fullname` is `spacer` or a `spacer.*` module name, aliased or not."""
    return fullname == ALIAS or fullname.startswith(ALIAS + ".")


def target_name(fullname: str) -> str | None:
    """The spacer_core module that pyspacer's `fullname` stands for; None if the alias does not serve it."""
    if fullname in RENAMED:
        return RENAMED[fullname]
    if fullname in PYSPACER_MODULES:
        return TARGET + fullname[len(ALIAS) :]
    return None


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds pyspacer's `spacer.*` modules as the spacer_core modules of the same name; refuses the rest."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if not in_alias_namespace(fullname):
            return None
        name = target_name(fullname)
        if name is None:
            # Refuse here: later finders would search spacer_core's folder
            # under the alias and load a second copy of one of our modules.
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: the spacer alias serves pyspacer 0.14.0's modules only;"
                f" import this project's modules as spacer_core.*",
                name=fullname,
            )
        try:
            real = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            real = None
        if real is None:
            return None  # the import fails as usual, naming `fullname`
        return importlib.machinery.ModuleSpec(
            fullname, self, is_package=real.submodule_search_locations is not None
        )

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        module = importlib.import_module(target_name(spec.name))  # type: ignore[arg-type]
        # The import system stamps the alias spec onto the module it is given;
        # keep the real one with the alias spec so exec_module can put it back.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its real name; only undo the spec stamp.
        spec = module.__spec__
        assert spec is not None
        module.__spec__ = spec.loader_state


_FINDER = AliasFinder()


def installed() -> bool:
    """Whether the alias is active in this process."""
    return _FINDER in sys.meta_path


def install() -> None:
    """Make `import spacer...` load spacer_core from now on (idempotent).

    Raises RuntimeError if the real pyspacer was already imported here: its
    modules would stay bound wherever they were imported.
    """
    if installed():
        return
    loaded = sorted(name for name in sys.modules if in_alias_namespace(name))
    if loaded:
        raise RuntimeError(
            f"pyspacer modules {loaded} are already imported; install the spacer alias before importing them"
        )
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the alias and forget the `spacer.*` names it gave out."""
    if installed():
        sys.meta_path.remove(_FINDER)
    for name in [n for n in sys.modules if in_alias_namespace(n)]:
        del sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    """`python -m spacer_core.compat program.py [args...]`: run a pyspacer program on spacer_core."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m spacer_core.compat program.py [args...]", file=sys.stderr)
        return 2
    install()
    sys.argv = list(args)
    runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
