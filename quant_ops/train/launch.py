"""``python -m quant_ops.train.launch -n 2 -s 1 -- <worker command>``: a dist_sync job on
this machine (scheduler, servers and workers on loopback).  For several machines, MXNet's
own ssh/mpi launch modes start the same worker command with the same DMLC_* variables."""
from __future__ import annotations

import argparse
import sys

from ..errors import QuantOpsError
from .distributed import launch_local


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--num-workers", type=int, default=2)
    ap.add_argument("-s", "--num-servers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole job")
    ap.add_argument("--log-dir", help="one log file per process")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("error: give the worker command after --", file=sys.stderr)
        return 2
    try:
        launch_local(cmd, args.num_workers, args.num_servers, args.timeout, args.log_dir)
    except QuantOpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
