"""gRPC serving: the jinfer.v1.Inference service (inference.proto), its server and client."""
