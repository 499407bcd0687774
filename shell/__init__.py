"""The `spacer` command line: serve, health, the survey commands on CoralNet's files, bulk and demo.

This package imports nothing on its own: `python -m shell` runs
`shell/__main__.py`, which cleans `sys.path` before any other import.
"""
