"""``lora runner serve``: the runner service of service mode (started as root).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lora_kernel.common.paths import RUNNER_SOCKET, SERVICE_STATE_DIR


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve run, review, publish and recover requests until interrupted."""
    import logging

    from lora_kernel.trusted.service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    serve(Path(args.socket), Path(args.state).resolve(), args.service_user)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``runner`` to the ``lora`` CLI."""
    runner = sub.add_parser("runner", help="the runner service (service mode, as root)")
    rsub = runner.add_subparsers(dest="runner_command", metavar="ACTION")
    rsub.required = True
    p = rsub.add_parser("serve", help="serve runs on a Unix socket: kernels run as the "
                                      "requesting user, records are written as the service "
                                      "account",
                        description="Start as root. The state directory is made the service "
                                    "account's (0700); users reach the service through the "
                                    "socket, which tells it who they are (SO_PEERCRED).")
    p.add_argument("--state", default=str(SERVICE_STATE_DIR),
                   help=f"state directory (default {SERVICE_STATE_DIR})")
    p.add_argument("--service-user", default="lora-svc",
                   help="the account that owns records, ledger and key (default lora-svc)")
    p.add_argument("--socket", default=str(RUNNER_SOCKET),
                   help=f"Unix socket to listen on (default {RUNNER_SOCKET})")
    p.set_defaults(func=cmd_serve)
