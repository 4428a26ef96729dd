"""Generated gRPC stubs for logbroker.v1 (see proto_gen.py)."""
