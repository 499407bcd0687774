"""Caffe models without Caffe: the model schema (caffe.proto) and a PyTorch builder."""

from spacer_core.caffe.network import (
    CaffeModelError,
    CaffeNet,
    blob_array,
    build_caffe_network,
    output_size,
    parse_definition,
    parse_weights,
    pooled_size,
)

__all__ = [
    "CaffeModelError",
    "CaffeNet",
    "blob_array",
    "build_caffe_network",
    "output_size",
    "parse_definition",
    "parse_weights",
    "pooled_size",
]
