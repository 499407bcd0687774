"""`python -m shell` is the `spacer` console script.

`python -m` puts the working directory first on sys.path, and `spacer serve`
is usually started in its data root, where clients write files: a client's
`grpc_health.py` there would be imported in place of the real module. So,
before anything else is imported, the working directory leaves sys.path
unless it is where the `shell` package itself lives (a source checkout).
"""

import os
import sys


def _drop_working_directory() -> None:
    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    cwd = os.path.realpath(os.getcwd())
    if cwd == here:
        return
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != cwd]


_drop_working_directory()

try:
    from shell.main import console  # noqa: E402  (after sys.path is cleaned)
except KeyboardInterrupt:
    # Ctrl-C before the guard in `main` is in place: the same one line and status as inside it.
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)

console()
