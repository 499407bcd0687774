"""Run code written for pyspacer on this library: an opt-in `spacer` -> `spacer_core` import alias.

    import spacer_core.compat
    spacer_core.compat.install()
    from spacer.tasks import extract_features      # spacer_core.tasks

or, for an unchanged program:

    python -m spacer_core.compat program.py [args...]

`install()` puts a finder first on `sys.meta_path`, so `spacer` and every
`spacer.<module>` resolve to the same-named module of spacer_core even where
the real pyspacer is installed. pyspacer 0.5.0's module
`spacer.extract_features` resolves to `spacer_core.extractors`. The modules
are spacer_core's own objects (not copies): `spacer.tasks is
spacer_core.tasks` once the alias is installed.
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
# Module paths of earlier pyspacer releases that moved or merged since.
RENAMED = {
    "spacer.extract_features": "spacer_core.extractors",  # pyspacer 0.5.0
}


def target_name(fullname: str) -> str | None:
    """The spacer_core module that `fullname` (spacer or spacer.*) stands for; None if not aliased."""
    if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
        return None
    return RENAMED.get(fullname, TARGET + fullname[len(ALIAS) :])


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `spacer.*` as the spacer_core module of the same name."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        name = target_name(fullname)
        if name is None:
            return None
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
    loaded = sorted(name for name in sys.modules if target_name(name) is not None)
    if loaded:
        raise RuntimeError(
            f"pyspacer modules {loaded} are already imported; install the spacer alias before importing them"
        )
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the alias and forget the `spacer.*` names it gave out."""
    if installed():
        sys.meta_path.remove(_FINDER)
    for name in [n for n in sys.modules if target_name(n) is not None]:
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
