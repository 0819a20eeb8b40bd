"""Kept so that ``python -m quant_ops.train.launch`` still works: the command is
``python -m quant_ops.cli.launch`` (the launcher itself is ``distributed.launch_local``)."""

if __name__ == "__main__":
    import sys

    from quant_ops.cli.launch import main

    sys.exit(main())
