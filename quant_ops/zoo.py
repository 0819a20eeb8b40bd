"""gluoncv model-zoo access (architectures only: no weights can be downloaded here)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from .errors import QuantOpsError


def import_gluoncv():
    """Import gluoncv 0.10.x, which raises RuntimeError at import when torch >= 2 is
    importable (its torch version check); hide torch from that check only."""
    if "gluoncv" in sys.modules:
        return sys.modules["gluoncv"]
    saved = sys.modules.get("torch", ...)
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import gluoncv
    except ImportError as e:
        raise QuantOpsError(f"gluoncv is not installed ({e}): pip install gluoncv==0.10.5.post0")
    finally:
        if saved is ...:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved
    return gluoncv


def get_model(name: str, **kwargs):
    """A gluoncv model-zoo network with random weights (``pretrained=False``)."""
    gcv = import_gluoncv()
    if name.lower() not in gcv.model_zoo.get_model_list():
        raise QuantOpsError(f"unknown gluoncv model {name!r}: see "
                            "gluoncv.model_zoo.get_model_list()")
    # detection, segmentation and pose nets download ImageNet weights for their backbone
    # unless told not to; the nets that do not know the flag refuse it, with a TypeError
    # or (darknet53, whose block checks its own kwargs) a bare Warning naming the kwargs
    with _reset_ctx_skips_uninitialized():
        try:
            return gcv.model_zoo.get_model(name, pretrained=False,
                                           **{"pretrained_base": False, **kwargs})
        except (TypeError, Warning) as e:
            refused = "pretrained_base" in str(e) or type(e) is Warning
            if not refused or "pretrained_base" in kwargs:
                raise
        return gcv.model_zoo.get_model(name, pretrained=False, **kwargs)


@contextmanager
def _reset_ctx_skips_uninitialized():
    """gluoncv's action-recognition constructors (``vgg16_ucf101`` and kin) move every
    parameter to ``ctx`` at the end, which fails on the backbone that
    ``pretrained_base=False`` leaves for the caller to initialize; skip those."""
    from mxnet.gluon.parameter import Parameter

    original = Parameter.reset_ctx

    def reset_ctx(self, ctx):
        if self._data is None and self._deferred_init == ():
            return None
        return original(self, ctx)

    Parameter.reset_ctx = reset_ctx
    try:
        yield
    finally:
        Parameter.reset_ctx = original
