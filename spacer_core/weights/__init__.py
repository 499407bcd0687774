"""Network weight files: seeded synthetic EfficientNet-b0 weights (`synthetic`).

Not part of pyspacer's API (the `spacer` alias does not map it).
"""
