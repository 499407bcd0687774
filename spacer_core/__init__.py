"""pyspacer-compatible library: extract point features, train and apply classifiers.

Three kinds of module live here (docs/architecture.md draws them and says
what each may import; tests/project/test_architecture.py holds them to it):

pyspacer's API, frozen names: the modules pyspacer 0.14.0 has, under its
module names, with its public names and signatures (tests/spacer_core/
test_compat.py compares them with the real pyspacer). Code written for
pyspacer runs on them through the opt-in `spacer` alias (`compat`), which
serves these modules and no others:

    aws, config, data_classes, exceptions, mailman, messages, storage,
    task_utils, tasks, train_classifier, train_utils,
    extractors (base, efficientnet, efficientnet_utils, torch_extractors,
    utils, vgg16)

The rest of `extractors` (dummy, class_paths, torch_weights) and `caffe/`
(Caffe model files without Caffe, for VGG16) support these modules.

The engine, this project's own, behind pyspacer's API: `runtime` (the
shared caches and the active storage policy), `pipeline` (image bytes to
features and scores), `inference/` (compiled backends, dynamic batcher),
`crop`, `images`, `limits`, `cancellation`, `pickle_guard`, `legacy`,
`urlfetch`, `locations`, `task_io`, and `compat` (the `spacer` alias).

Workflow rooms, also this project's own and never reachable as `spacer.*`:
`survey/` (a survey folder's workflows, CoralNet CSVs, reports, the demo),
`bulk/` (bulk work, locally or on Ray), `weights/` (weight files: synthetic,
ImageNet) and `testing` (synthetic builders for tests and benchmarks).
"""

from spacer_core._crop_rs import __version__

__all__ = ["__version__"]
