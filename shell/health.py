"""`spacer health`: a server's gRPC health status, for container probes."""

from __future__ import annotations

import argparse
import sys

from shell.errors import UsageError

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`health [ADDR | --server ADDR] [--service S] [--timeout T]`."""
    health = sub.add_parser(
        "health",
        help="ask a server's gRPC health service; exit 0 when SERVING (container probes)",
        description="Ask a running `spacer serve` for its gRPC health status and print it."
        " Exit 0 when SERVING, 1 otherwise (NOT_SERVING, unreachable, no answer in time)."
        " The server is named as ADDR or, as in `spacer demo`, with --server ADDR.",
    )
    health.add_argument(
        "address", nargs="?", metavar="ADDR", help=f"the server's host:port (default {DEFAULT_ADDRESS})"
    )
    health.add_argument(
        "--server", metavar="ADDR", help="the server's host:port, the spelling other commands use"
    )
    health.add_argument("--service", default="", help="service to ask about (default: the server as a whole)")
    health.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )


def server_address(args: argparse.Namespace) -> str:
    """The address given positionally or with --server (the same one if both), else the default."""
    if args.address and args.server and args.address != args.server:
        raise UsageError(f"health: two servers named ({args.address} and --server {args.server}); give one")
    return args.server or args.address or DEFAULT_ADDRESS


def run(args: argparse.Namespace) -> int:
    """Print the serving status; 0 for SERVING, 1 otherwise (NOT_SERVING, unreachable, unknown).

    Probes and operators read health answers as status names, so those are kept.
    """
    address = server_address(args)
    if args.timeout <= 0:
        raise UsageError(f"health --timeout {args.timeout:g}: expected seconds > 0")
    import grpc

    from server.client import SpacerClient

    with SpacerClient(address, timeout=args.timeout) as client:
        try:
            status = client.health(args.service)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1
