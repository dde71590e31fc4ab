"""Generated protobuf and gRPC stubs of proto/explain/v1/explain.proto (``make proto``)."""
