"""TensorRT calibration cache (legacy implicit INT8) and a JSON of per-tensor ranges.

TensorRT's implicit INT8 mode can skip calibration when it is handed a cache that
its calibrator would have written: a header ``TRT-<version>-<Algorithm>`` and one
``name: hex`` line per activation tensor, ``hex`` being the big-endian IEEE-754
bits of the float32 ``scale = amax / 127``. Writing that file lets ranges found by
this toolkit drive a TensorRT engine (or onnxruntime's TensorRT execution provider
with ``trt_int8_use_native_calibration_table``) without a second calibration.
TensorRT computes weight scales itself, so only activation tensors belong here.

The JSON file ``{tensor: amax}`` is for code that sets ranges directly, e.g. a
builder script calling TensorRT's ``ITensor.setDynamicRange(-amax, amax)``.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np

from quant_ops.errors import QuantOpsError
from quant_ops.fileio import atomic_write_text

__all__ = ["ALGORITHMS", "scale_hex", "hex_to_scale", "write_cache", "read_cache",
           "write_ranges_json", "read_ranges_json"]

#: The algorithm names TensorRT writes in the cache header; TensorRT rebuilds the
#: cache when the header names another algorithm than its calibrator's.
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration",
              "LegacyCalibration")

_F32_127 = np.float32(127)
_HEADER = re.compile(r"TRT-(\d+)-([A-Za-z0-9]+)")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


def _amax_f32(amax, what: str) -> np.float32:
    """``amax`` as float32, or an error naming ``what``: a range must be finite and >= 0."""
    if isinstance(amax, (bool, np.bool_)):
        raise QuantOpsError(f"{what}: amax must be a number, got {amax!r}")
    try:
        value = float(amax)
    except (TypeError, ValueError):
        raise QuantOpsError(f"{what}: amax must be a number, got {amax!r}") from None
    if not math.isfinite(value) or value < 0:
        raise QuantOpsError(f"{what}: amax must be finite and >= 0, got {value!r}")
    with np.errstate(over="ignore"):
        f32 = np.float32(value)
    # The cache holds the scale; make sure it comes back as a finite amax too.
    with np.errstate(over="ignore"):
        back = (f32 / _F32_127) * _F32_127
    if not np.isfinite(f32) or not np.isfinite(back):
        raise QuantOpsError(f"{what}: amax {value!r} does not fit in float32")
    return f32


def _scale_f32(amax, what: str) -> np.float32:
    """The float32 scale TensorRT stores for ``amax``, computed in float32 like TensorRT."""
    return _amax_f32(amax, what) / _F32_127


def scale_hex(amax: float) -> str:
    """Cache text for ``amax``: 8 lower-case hex digits of the float32 scale amax/127.

    Big-endian bit pattern, so the digits read as the IEEE-754 word TensorRT prints.
    """
    scale = _scale_f32(amax, "scale_hex")
    (bits,) = struct.unpack(">I", struct.pack(">f", scale))
    return f"{bits:08x}"


def hex_to_scale(h: str) -> float:
    """The float32 scale a cache's hex word encodes (the inverse of :func:`scale_hex`'s bits)."""
    text = h.strip() if isinstance(h, str) else h
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise QuantOpsError(f"hex_to_scale: expected 1 to 8 hex digits, got {h!r}")
    (scale,) = struct.unpack(">f", struct.pack(">I", int(text, 16)))
    return scale


def _check_name(name, what: str) -> None:
    """TensorRT's format splits a line at ': ', so a name may not hold ':' or a line break;
    readers that strip spaces would change a name with surrounding blanks."""
    if not isinstance(name, str) or not name:
        raise QuantOpsError(f"{what}: tensor name must be a non-empty string, got {name!r}")
    if ":" in name or "\n" in name or "\r" in name:
        raise QuantOpsError(f"{what}: tensor {name!r} holds ':' or a line break, "
                            "which the TensorRT cache format cannot carry")
    if name != name.strip():
        raise QuantOpsError(f"{what}: tensor {name!r} starts or ends with whitespace, "
                            "which cache readers strip")


def write_cache(path, ranges: dict[str, float], trt_version: int = 8601,
                algorithm: str = "EntropyCalibration2") -> Path:
    """Write a TensorRT calibration cache for the activation ranges ``{tensor: amax}``.

    ``trt_version`` is TensorRT's number for itself (8601 for 8.6.1); TensorRT
    recalibrates when it differs from its own, so pass the version that will read it.
    Lines keep the order of ``ranges``. Everything is checked before the file is made.
    """
    p = Path(path)
    if isinstance(trt_version, bool) or not isinstance(trt_version, (int, np.integer)) \
            or trt_version <= 0:
        raise QuantOpsError(f"{p}: trt_version must be a positive integer, got {trt_version!r}")
    if algorithm not in ALGORITHMS:
        raise QuantOpsError(f"{p}: algorithm {algorithm!r} is not one TensorRT writes; "
                            f"use one of {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{int(trt_version)}-{algorithm}"]
    for name, amax in ranges.items():
        _check_name(name, str(p))
        scale = _scale_f32(amax, f"{p}: tensor {name!r}")
        (bits,) = struct.unpack(">I", struct.pack(">f", scale))
        lines.append(f"{name}: {bits:08x}")
    return atomic_write_text(p, "\n".join(lines) + "\n")


def _read_text(p: Path) -> str:
    try:
        return p.read_bytes().decode("utf-8")
    except OSError as e:
        raise QuantOpsError(f"{p}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise QuantOpsError(f"{p}: not UTF-8 text: {e}") from e


def read_cache(path) -> tuple[dict[str, float], dict]:
    """Read a TensorRT calibration cache back as ``({tensor: amax}, {"version", "algorithm"})``.

    amax is scale * 127 in float32, the range TensorRT itself derives from the cache.
    """
    p = Path(path)
    lines = _read_text(p).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise QuantOpsError(f"{p}:1: empty file, expected a 'TRT-<version>-<Algorithm>' header")
    m = _HEADER.fullmatch(lines[0].strip())
    if m is None:
        raise QuantOpsError(f"{p}:1: expected a 'TRT-<version>-<Algorithm>' header, "
                            f"got {lines[0]!r}")
    if m.group(2) not in ALGORITHMS:
        raise QuantOpsError(f"{p}:1: unknown calibration algorithm {m.group(2)!r}; "
                            f"TensorRT writes {', '.join(ALGORITHMS)}")
    meta = {"version": int(m.group(1)), "algorithm": m.group(2)}
    ranges: dict[str, float] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or ":" in value:
            raise QuantOpsError(f"{p}:{lineno}: expected 'name: hex', got {line!r}")
        if not _HEX.fullmatch(value):
            raise QuantOpsError(f"{p}:{lineno}: tensor {name!r}: scale {value!r} is not "
                                "1 to 8 hex digits")
        if name in ranges:
            raise QuantOpsError(f"{p}:{lineno}: tensor {name!r} is listed twice")
        scale = np.float32(hex_to_scale(value))
        if not np.isfinite(scale) or scale < 0:
            raise QuantOpsError(f"{p}:{lineno}: tensor {name!r}: scale {value} decodes to "
                                f"{float(scale)!r}, not a finite value >= 0")
        with np.errstate(over="ignore"):
            amax = scale * _F32_127
        if not np.isfinite(amax):
            raise QuantOpsError(f"{p}:{lineno}: tensor {name!r}: scale {value} gives an "
                                "amax beyond float32")
        ranges[name] = float(amax)
    return ranges, meta


def write_ranges_json(path, ranges: dict[str, float]) -> Path:
    """Write ``{tensor: amax}`` as a JSON object, for code that sets ranges directly.

    Values are written as given (Python floats round-trip exactly through JSON).
    """
    p = Path(path)
    out: dict[str, float] = {}
    for name, amax in ranges.items():
        if not isinstance(name, str) or not name:
            raise QuantOpsError(f"{p}: tensor name must be a non-empty string, got {name!r}")
        _amax_f32(amax, f"{p}: tensor {name!r}")
        out[name] = float(amax)
    return atomic_write_text(p, json.dumps(out, indent=2, allow_nan=False) + "\n")


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise QuantOpsError(f"tensor {k!r} is listed twice")
        d[k] = v
    return d


def _no_constant(token):
    raise QuantOpsError(f"{token} is not a valid amax")


def read_ranges_json(path) -> dict[str, float]:
    """Read ``{tensor: amax}`` written by :func:`write_ranges_json`, checking every value."""
    p = Path(path)
    text = _read_text(p)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise QuantOpsError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from e
    except QuantOpsError as e:
        raise QuantOpsError(f"{p}: {e}") from e
    if not isinstance(data, dict):
        raise QuantOpsError(f"{p}: expected a JSON object {{tensor: amax}}, "
                            f"got {type(data).__name__}")
    ranges: dict[str, float] = {}
    for name, amax in data.items():
        if not name:
            raise QuantOpsError(f"{p}: empty tensor name")
        if isinstance(amax, bool) or not isinstance(amax, (int, float)):
            raise QuantOpsError(f"{p}: tensor {name!r}: amax must be a number, got {amax!r}")
        _amax_f32(amax, f"{p}: tensor {name!r}")
        ranges[name] = float(amax)
    return ranges
