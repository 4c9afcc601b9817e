#!/bin/sh
# Regenerate the Python modules of gridmesh_inference.proto (needs grpcio-tools).
# Compiling from the repository root makes the generated imports absolute
# (`from daemon.api.proto import gridmesh_inference_pb2`).
set -eu
cd "$(dirname "$0")/../../.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out=. --grpc_python_out=. --pyi_out=. \
    daemon/api/proto/gridmesh_inference.proto
