"""Container health check: the server's gRPC health service says gradwatch.v1.Ingest is SERVING.

Exit status 0 when healthy, 1 otherwise (Docker's HEALTHCHECK contract). Reads the port from
$GRADWATCH_GRPC_PORT (default 50051). When the gRPC port serves TLS ($GRADWATCH_TLS_CERT_FILE is set) a
plaintext health call cannot succeed, so it only checks that the port accepts connections.
"""

from __future__ import annotations

import os
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "gradwatch.v1.Ingest"
TIMEOUT_S = 4.0


def main() -> int:
    port = int(os.environ.get("GRADWATCH_GRPC_PORT") or 50051)
    target = f"127.0.0.1:{port}"
    if os.environ.get("GRADWATCH_TLS_CERT_FILE"):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
        except OSError as exc:
            print(f"gradwatch healthcheck: {target}: {exc}", file=sys.stderr)
            return 1
        return 0
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"gradwatch healthcheck: {target}: {exc.code().name}", file=sys.stderr)
            return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"gradwatch healthcheck: {SERVICE} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
