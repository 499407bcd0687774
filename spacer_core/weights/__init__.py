"""Network weight files: seeded synthetic EfficientNet-b0 weights (`synthetic`).

ImageNet-pretrained EfficientNet-b0 weights converted to CoralNet's format (`imagenet`).

Not part of pyspacer's API (the `spacer` alias does not map it).
"""
