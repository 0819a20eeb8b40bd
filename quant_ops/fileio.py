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


#: the longest output name stem, in UTF-8 bytes: file systems take 255 per name, and the
#: staging prefixes and suffixes (``.<name>.staged-…``, ``-symbol.json``) need the rest
MAX_NAME_BYTES = 200


def plain_name(name: str, what: str = "name") -> str:
    """A file-name stem for outputs: no folder part and no leading '.', so what is written
    with it stays in its output folder, and short enough to be a file name."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name \
            or name.startswith(".") or "\0" in name:
        raise QuantOpsError(f"{what} {name!r}: give a plain file name (no '/', no leading "
                            "'.'); outputs go into the output folder")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise QuantOpsError(f"{what} '{name[:40]}...' is {size} bytes long: at most "
                            f"{MAX_NAME_BYTES}")
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


def _hard_link(src: Path, dst: Path) -> bool:
    """Link ``dst`` to ``src``; False where the file system has no hard links."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        return False


def remove_empty(folders) -> None:
    """Remove each folder (innermost first) while it is empty; one never made is skipped."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break


def missing_folders(path: Path) -> list:
    """``path`` and the folders above it that do not exist yet, innermost first: what
    creating ``path`` makes, in the order ``remove_empty`` takes them back."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _move_in(tmp: Path, out: Path) -> None:
    """Move every file of ``tmp`` into ``out``, replacing files of the same names, all or
    none: the files replaced are set aside in ``tmp`` first and put back if a move fails."""
    new = sorted(f for f in tmp.iterdir() if f.name != ".previous")
    for f in new:
        t = out / f.name
        if (t.is_dir() and not t.is_symlink()) != f.is_dir() and (t.exists() or t.is_symlink()):
            kind = "a folder" if t.is_dir() else "a file"
            raise QuantOpsError(f"{t}: is {kind}, where this run writes its output "
                                f"'{f.name}': move it away or choose another output folder")
    previous = tmp / ".previous"
    previous.mkdir()
    kept, placed = [], []     # replaced files (a hard link, or moved aside), files moved in
    try:
        for f in new:
            t = out / f.name
            if t.is_file() and not t.is_symlink() and not f.is_dir() \
                    and _hard_link(t, previous / f.name):   # a reader still sees the old file
                kept.append((f.name, True))
            elif t.exists() or t.is_symlink():
                os.rename(t, previous / f.name)
                kept.append((f.name, False))
            os.replace(f, t)
            placed.append(f.name)
    except BaseException as e:    # also a stop signal: put everything back, then go on
        for name in reversed(placed):
            os.replace(out / name, tmp / name)
        for name, linked in reversed(kept):
            if linked or not (out / name).exists():
                os.replace(previous / name, out / name)
        if isinstance(e, OSError):
            raise QuantOpsError(f"{out}: cannot write there ({e.strerror}); nothing was "
                                "changed") from None
        raise


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A hidden folder to write into.  On success: when ``out`` did not exist the folder is
    renamed to ``out`` (one atomic step: a kill leaves it whole or absent); otherwise its
    files move into ``out``, all or none.  On failure it is removed, with ``out`` and the
    folders above it that this call would have created."""
    out = Path(out).resolve()   # as the kernel resolves it: the no-overwrite checks agree
    created = not out.exists()
    made = missing_folders(out.parent) if created else []
    tmp = None
    try:
        try:
            if created:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staged-"))
            else:
                tmp = Path(tempfile.mkdtemp(dir=out, prefix=".staged-"))
        except OSError as e:
            raise QuantOpsError(f"{out}: cannot write there ({e.strerror})") from None
        yield tmp
        if created:
            os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700: the usual folder mode
            try:
                os.rename(tmp, out)
            except OSError as e:
                raise QuantOpsError(f"{out}: cannot write there ({e.strerror})") from None
            made = []
        else:
            _move_in(tmp, out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
