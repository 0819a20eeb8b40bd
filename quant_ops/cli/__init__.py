"""Command lines, one module per command (``utils/*.py`` and the ``qo-*`` console scripts
call their ``main``): ``graph_optimize``, ``export_onnx``, ``qat_train``, ``sensitivity``
and ``launch`` (``python -m quant_ops.cli.launch``).  ``common`` holds what they share.

Bad input ends with one ``error:`` line on stderr and exit code 2.  The library never
imports this package.
"""
