"""``python -m quant_ops.cli.launch -n 2 -s 1 -- <worker command>``: a dist_sync job on
this machine (scheduler, servers and workers on loopback).  For several machines, MXNet's
own ssh/mpi launch modes start the same worker command with the same DMLC_* variables."""
from __future__ import annotations

import argparse
import sys

from ..errors import QuantOpsError
from ..train.distributed import launch_local
from .common import error


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--num-workers", type=int, default=2)
    ap.add_argument("-s", "--num-servers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole job")
    ap.add_argument("--log-dir", help="one log file per process")
    ap.add_argument("--interface", help="network interface the processes bind to "
                                        "(default: loopback)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Exit code 2: no worker command; 1: the job failed (a worker died, or the timeout)."""
    args = build_parser().parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        return error("give the worker command after --")
    for flag, v in (("--num-workers", args.num_workers), ("--num-servers", args.num_servers)):
        if v < 1:
            return error(f"{flag} must be >= 1, got {v}")
    if not args.timeout > 0:
        return error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    try:
        launch_local(cmd, args.num_workers, args.num_servers, args.timeout, args.log_dir,
                     interface=args.interface)
    except QuantOpsError as e:  # names the process and ends with its log: keep the lines
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
