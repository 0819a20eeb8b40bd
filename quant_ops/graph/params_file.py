"""A bounds-checked reader of MXNet's ``.params`` format (what ``mx.nd.save`` writes).

MXNet's own ``mx.nd.load`` trusts the sizes recorded in the file: a truncated or spliced
file can make it read past the buffer and kill the process.  This reader checks every
count, rank, dimension and byte length against what is left of the file before using it,
and turns the dense arrays into numpy arrays without MXNet, so a bad file is an error
that names it, never a crash.

Layout (little-endian), from MXNet 1.x ``src/ndarray/ndarray.cc``:
list header u64 ``0x112``, u64 reserved, u64 array count, the arrays, u64 name count, names
(u64 length + bytes).  One array: u32 magic (V2 ``0xF993FAC9``, V3 ``0xF993FACA``, V1
``0xF993FAC8``, or a legacy file's rank), for V2/V3 an i32 storage type, the shape (i32 rank
+ i64 dims; legacy: u32 dims), then (unless the shape is empty) i32 device type, i32 device
id, i32 dtype flag and the data.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import QuantOpsError

LIST_MAGIC = 0x112
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
MAX_RANK = 32
# MXNet's dtype flags (mshadow::TypeFlag) that numpy can hold
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
          6: np.int64, 7: np.bool_}


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = memoryview(data), 0, source

    def fail(self, what: str) -> QuantOpsError:
        return QuantOpsError(f"{self.source}: not an MXNet params file ({what} at "
                             f"byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(f"{what}: {n} bytes wanted, {len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def count(self, what: str, least_bytes_each: int) -> int:
        (n,) = self.unpack("Q", what)
        if n * least_bytes_each > len(self.data) - self.pos:
            raise self.fail(f"{what} {n} does not fit in the file")
        return n


def _shape(r: _Reader, magic: int) -> tuple[int, ...] | None:
    if magic in (V1, V2, V3):
        (ndim,) = r.unpack("i", "rank")
        if ndim == -1 and magic == V3:
            return None        # a shape never set: MXNet loads it as an empty array
        fmt = "q"
    else:                      # legacy: the magic was the rank, dims are u32
        ndim, fmt = magic, "I"
    if not 0 <= ndim <= MAX_RANK:
        raise r.fail(f"rank {ndim}")
    dims = r.unpack(f"{ndim}{fmt}", "shape")
    if any(d < 0 for d in dims):
        raise r.fail(f"negative dimension in shape {dims}")
    return tuple(dims)


def _array(r: _Reader) -> np.ndarray | None:
    (magic,) = r.unpack("I", "array header")
    if magic in (V2, V3):
        (stype,) = r.unpack("i", "storage type")
        if stype != 0:
            raise r.fail(f"sparse storage (type {stype}) is not supported")
    shape = _shape(r, magic)
    if shape is None or (magic != V3 and len(shape) == 0):
        return None            # MXNet's "none" array
    r.unpack("ii", "device")
    (flag,) = r.unpack("i", "dtype flag")
    if flag not in DTYPES:
        raise r.fail(f"dtype flag {flag} (bfloat16 or unknown)")
    dtype = np.dtype(DTYPES[flag])
    size = 1
    for d in shape:
        size *= d
    raw = r.take(size * dtype.itemsize, f"data of shape {shape}")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def read_params_file(path: str | Path) -> dict[str, np.ndarray] | list:
    """The arrays of a ``.params`` file: a dict when it names them, else a list."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise QuantOpsError(f"{p}: cannot read the params file ({e.strerror})") from None
    r = _Reader(data, str(p))
    header, _ = r.unpack("QQ", "file header")
    if header != LIST_MAGIC:
        raise r.fail(f"header 0x{header:x} is not MXNet's 0x{LIST_MAGIC:x}")
    arrays = [_array(r) for _ in range(r.count("array count", 4))]
    names = []
    for _ in range(r.count("name count", 8)):
        (n,) = r.unpack("Q", "name length")
        try:
            names.append(bytes(r.take(n, "name")).decode("utf-8"))
        except UnicodeDecodeError:
            raise r.fail("a name that is not UTF-8") from None
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} bytes after the end of the data")
    if not names:
        return arrays
    if len(names) != len(arrays):
        raise r.fail(f"{len(names)} names for {len(arrays)} arrays")
    if len(set(names)) != len(names):
        raise r.fail("a name given twice")
    return {k: (np.zeros(0, np.float32) if v is None else v) for k, v in zip(names, arrays)}
