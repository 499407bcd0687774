"""A survey on local disk: the workflows behind the shell's CSV forms and the demo.

- `workflow`: extract, train, classify and evaluate a folder of images from CoralNet CSVs.
- `coralnet`: CoralNet's CSV formats and point layouts.
- `reports`: the HTML reports of training, classification and evaluation.
- `demo`: a synthetic survey to try the workflow on.

Not part of pyspacer's API (the `spacer` alias does not map it).
"""
