#!/bin/sh
# Regenerate the Python modules of aios_vdag.proto (needs grpcio-tools), as generate.sh does
# for gridmesh_inference.proto: compiled from the repository root, the generated imports are
# absolute (`from daemon.api.proto import aios_vdag_pb2`).
set -eu
cd "$(dirname "$0")/../../.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m grpc_tools.protoc -I . \
    --python_out=. --grpc_python_out=. --pyi_out=. \
    daemon/api/proto/aios_vdag.proto
