"""Writing outputs so that nothing is lost: a file appears whole or not at all, and a set
of files lands together or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import QuantOpsError


def plain_name(name: str, what: str = "name") -> str:
    """A file-name stem for outputs: no folder part and no leading '.', so what is written
    with it stays in its output folder."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name \
            or name.startswith(".") or "\0" in name:
        raise QuantOpsError(f"{what} {name!r}: give a plain file name (no '/', no leading "
                            "'.'); outputs go into the output folder")
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then given the mode the
    user's umask gives and renamed over ``path``: a reader never sees half a file and a
    failure leaves none."""
    p = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, p)
        tmp = None
    except OSError as e:
        raise QuantOpsError(f"{p}: cannot write: {e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A hidden folder to write into.  On success: when ``out`` did not exist the folder is
    renamed to ``out`` (one atomic step: a kill leaves it whole or absent); otherwise its
    files move into ``out``.  On failure it is removed, with ``out`` when this call would
    have created it."""
    out = Path(out)
    created = not out.exists()
    try:
        if created:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staged-"))
        else:
            tmp = Path(tempfile.mkdtemp(dir=out, prefix=".staged-"))
    except OSError as e:
        raise QuantOpsError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        if created:
            os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700: the usual folder mode
            os.rename(tmp, out)
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
