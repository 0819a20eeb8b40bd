"""The registry of quantization methods: the one place that names them.

Each module here holds one :class:`~quant_ops.methods.base.Method` descriptor (``METHOD``)
and is registered when the package is imported; every pipeline stage iterates over
:data:`REGISTRY` or looks a method up by its name or its operator.  A new method is a kernel
header, its registration, its numpy reference and a module here: nothing else.
"""
from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import Callable

from ..errors import QuantOpsError
from .base import QDQ, Input, Method, Param, flag

#: listed first, in this order (the seed toolkit's); any other module follows by name
_FIRST = ("int8", "pact", "lsq", "dorefa", "fqn", "gdrq", "qil", "dsq")

#: method name -> descriptor, in a fixed order
REGISTRY: dict[str, Method] = {}
#: operator name -> descriptor
BY_OP: dict[str, Method] = {}


_LISTENERS: list[Callable[[Method], None]] = []


def register(method: Method) -> Method:
    """Add a method (a plugin may call this for its own operator, after loading its
    library); the stages that wire operators up (the nd/sym front, the ONNX converters)
    are told, whenever it happens."""
    if method.name in REGISTRY or method.op in BY_OP:
        raise QuantOpsError(f"method {method.name!r} (operator {method.op}) is already "
                            "registered")
    REGISTRY[method.name] = method
    BY_OP[method.op] = method
    for fn in _LISTENERS:
        fn(method)
    return method


def on_register(fn: Callable[[Method], None]) -> None:
    """Call ``fn`` for every registered method, now and whenever one is added."""
    _LISTENERS.append(fn)
    for m in list(REGISTRY.values()):
        fn(m)


_found = {m.name for m in pkgutil.iter_modules(__path__)} - {"base"}
for _m in [n for n in _FIRST if n in _found] + sorted(_found - set(_FIRST)):
    register(import_module(f"{__name__}.{_m}").METHOD)


def get(name: str) -> Method:
    """The method called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise QuantOpsError(f"unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})") \
            from None


def of_op(op: str) -> Method | None:
    """The method whose operator is ``op`` (None: not a quantizer)."""
    return BY_OP.get(op)


def is_quantizer(op: str) -> bool:
    return op in BY_OP


def quantizer_ops() -> tuple[str, ...]:
    return tuple(BY_OP)


__all__ = ["Method", "Input", "Param", "QDQ", "REGISTRY", "register", "on_register", "get", "of_op",
           "is_quantizer", "quantizer_ops", "flag"]
