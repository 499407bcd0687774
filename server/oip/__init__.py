"""The Open Inference Protocol (KServe v2, Triton's gRPC API) beside spacer.v1.

`inference.GRPCInferenceService` is served on the same port as
`spacer.v1.Spacer` and runs through the same Engine: admission, priorities,
the dynamic batcher, the storage policy and the limits. See docs/oip.md.

- tensors: the protocol's tensors <-> numpy arrays
- models: the models a client can list and call, and the model repository
- stats: per-model statistics (ModelStatistics) and Triton's nv_* metrics
- dataplane: running, loading and unloading models through the Engine
- servicer: the service's methods, converting messages and calling the dataplane
"""
