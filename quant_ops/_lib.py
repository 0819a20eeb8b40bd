"""Find, build (when missing or stale in a source checkout) and load the operator library."""
from __future__ import annotations

import fcntl
import logging
from pathlib import Path

from . import _build
from .errors import BuildError

log = logging.getLogger(__name__)

PKG_DIR = Path(__file__).resolve().parent
LIB_DIR = PKG_DIR / "lib"
SRC_DIR = PKG_DIR.parent / "operator_cxx"  # present in a source checkout / editable install

_loaded: Path | None = None


def _check_versions() -> None:
    import numpy as np

    major, minor = (int(v) for v in np.__version__.split(".")[:2])
    if (major, minor) >= (1, 24):
        raise BuildError(f"numpy {np.__version__} breaks mxnet 1.9.1 (np.bool was removed in "
                         "1.24): pip install numpy==1.23.5")
    import mxnet as mx

    if not mx.__version__.startswith(_build.SUPPORTED_MXNET + "."):
        raise BuildError(f"quant_ops needs mxnet {_build.SUPPORTED_MXNET}.x, found "
                         f"{mx.__version__}")


def library_path() -> Path:
    """Path of a current library, building it first in a source checkout if needed."""
    lib = LIB_DIR / _build.LIB_NAME
    if not SRC_DIR.is_dir():
        if not lib.is_file():
            raise BuildError(f"operator library {lib} is missing and no sources are at "
                             f"{SRC_DIR}: reinstall quant_ops")
        return lib
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    digest_file = LIB_DIR / (_build.LIB_NAME + ".digest")
    with open(LIB_DIR / ".build.lock", "w") as lock:  # one builder at a time (test workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = _build.source_digest(SRC_DIR, _build.mxnet_dir())
        have = digest_file.read_text() if digest_file.is_file() else ""
        if not lib.is_file() or have != want:
            log.info("building the operator library from %s", SRC_DIR)
            _build.build(SRC_DIR, LIB_DIR)
    return lib


def load() -> Path:
    """Load the library into MXNet once per process; registers ``mx.nd/sym.<Op>``."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _check_versions()
    import mxnet as mx

    lib = library_path()
    try:
        mx.library.load(str(lib), verbose=False)
    except mx.base.MXNetError as e:
        raise BuildError(f"mxnet could not load {lib}: {e}") from e
    _loaded = lib
    return lib
