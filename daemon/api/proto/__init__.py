"""Generated gRPC modules of the inference API (see gridmesh_inference.proto, generate.sh)."""
