"""`spacer weights imagenet`: public ImageNet-pretrained EfficientNet-b0 weights in CoralNet's format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """`weights imagenet --out FILE [--source FILE]`."""
    parser = sub.add_parser(
        "weights",
        help="write extractor weights usable with --weights (a public start without CoralNet's)",
        description="Write EfficientNet-b0 weights files usable wherever --weights is asked for.",
    )
    kinds = parser.add_subparsers(dest="weights_command", required=True, metavar="KIND")
    imagenet = kinds.add_parser(
        "imagenet",
        parents=parents,
        help="ImageNet-pretrained EfficientNet-b0 (EfficientNet-PyTorch's release), converted",
        description="Download the published ImageNet EfficientNet-b0 weights (or read --source), check"
        " their sha256, convert them to CoralNet's format ({'net': state_dict}) and write --out."
        " Progress goes to stderr; stdout gets the sha256 of the written file, the value a message's"
        " data_hashes needs. Exit 0 when written, 1 when the source cannot be had or used, 2 on usage.",
    )
    imagenet.add_argument("-o", "--out", type=Path, required=True, help="the weights file to write")
    imagenet.add_argument(
        "--source",
        type=Path,
        metavar="FILE",
        help="the published efficientnet-b0-355c32eb.pth, already downloaded (no network needed);"
        " default: download it",
    )


def run(args: argparse.Namespace) -> int:
    """Write the converted weights and print their sha256; failures reach the shell's one-line report."""
    # The module is read at call time so its pinned digest is the one in force.
    from spacer_core.weights import imagenet

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    written = imagenet.fetch_imagenet_weights(
        args.out,
        args.source,
        url=imagenet.SOURCE_URL,
        expected_sha256=imagenet.SOURCE_SHA256,
        progress=say,
    )
    print(written.sha256)
    return 0
