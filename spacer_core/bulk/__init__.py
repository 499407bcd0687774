"""Bulk work on whole surveys: `local` plans and runs it in this process, `ray_engine` on Ray.

Not part of pyspacer's API (the `spacer` alias does not map it).
"""
