"""`spacer health`: a server's gRPC health status, for container probes."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`health [ADDRESS] [--service S] [--timeout T]`."""
    health = sub.add_parser(
        "health", help="ask a server's gRPC health service; exit 0 when SERVING (container probes)"
    )
    health.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port")
    health.add_argument("--service", default="", help="service to ask about; default: the server")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    """Print the serving status; 0 for SERVING, 1 otherwise (NOT_SERVING, unreachable, unknown).

    Probes and operators read health answers as status names, so those are kept.
    """
    import grpc

    from server.client import SpacerClient

    with SpacerClient(args.address, timeout=args.timeout) as client:
        try:
            status = client.health(args.service)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1
