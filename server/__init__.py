"""gRPC server for spacer_core: service spacer.v1.Spacer, health and reflection."""
