"""`python -m server` is the `spacer` console script."""

from server.cli import main

raise SystemExit(main())
