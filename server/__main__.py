"""`python -m server` is gone: the command line is the `shell` package (`spacer`, `python -m shell`).

This module imports nothing but `sys`, so starting it in a data root that holds
client-written files cannot run any of them.
"""

import sys

print(
    "the spacer command line is `spacer` or `python -m shell` (for example `python -m shell serve`)",
    file=sys.stderr,
)
raise SystemExit(2)
