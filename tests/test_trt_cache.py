"""TensorRT calibration cache and ranges JSON: exact float32 round trips, the reading
onnxruntime's TensorRT execution provider does, known bit patterns and error paths."""
import json
import math
import os
import struct

import numpy as np
import pytest

from quant_ops.errors import QuantOpsError
from quant_ops import fileio
from quant_ops.export import trt_cache
from quant_ops.export.trt_cache import (hex_to_scale, read_cache, read_ranges_json, scale_hex,
                                        write_cache, write_ranges_json)

RANGES = {
    "data": 2.6400001049041748,
    "conv0_fwd": 7.123456789,
    "relu0_fwd": 1e-3,
    "pool0_fwd": 127.0,
    "fc_out/with.odd-chars_1": 1234.5678,
    "tiny": 1e-30,
    "zero": 0.0,
}


def expected_amax(amax: float) -> np.float32:
    """What the cache can give back: scale computed in float32, then scale * 127 in float32."""
    return np.float32(np.float32(amax) / np.float32(127)) * np.float32(127)


def ort_read_dynamic_range(path) -> dict:
    """Independent re-implementation of onnxruntime's TensorRT EP ``ReadDynamicRange`` with
    is_trt_calibration_table=true (tensorrt_execution_provider_utils.h): the first line must
    contain 'TRT-' and is skipped; every other line is split at ':' into name and value, the
    value read as base-16 unsigned 32-bit, reinterpreted as IEEE-754 float, times 127."""
    with open(path, "rb") as f:
        lines = f.read().decode().split("\n")
    assert "TRT-" in lines[0].split(":")[0]
    out = {}
    for line in lines[1:]:
        if not line:
            continue  # the newline at the end of the file
        name, value = line.split(":")[:2]
        bits = int(value.strip(), 16)
        assert 0 <= bits <= 0xFFFFFFFF
        (scale,) = struct.unpack(">f", struct.pack(">I", bits))
        out[name.strip()] = np.float32(scale) * np.float32(127.0)
    return out


def ort_ieee754_to_float(bits: int) -> float:
    """onnxruntime's ConvertSinglePrecisionIEEE754ToFloat: decodes sign/exponent/mantissa by
    hand, treating every exponent as a normal number (so it is exact for normal floats)."""
    s = (bits >> 31) & 1
    e = ((bits & 0x7F800000) >> 23) - 127
    m = sum(((bits >> (22 - i)) & 1) * 2.0 ** -(i + 1) for i in range(23))
    return float(np.float32((-1 if s else 1) * 2.0 ** e * (m + 1.0)))


def test_round_trip_exact(tmp_path):
    path = write_cache(tmp_path / "calib.cache", RANGES)
    assert path == tmp_path / "calib.cache"
    ranges, meta = read_cache(path)
    assert meta == {"version": 8601, "algorithm": "EntropyCalibration2"}
    assert list(ranges) == list(RANGES)  # insertion order kept
    for name, amax in RANGES.items():
        got = np.float32(ranges[name])
        assert got == expected_amax(amax), name
        assert np.float32(hex_to_scale(scale_hex(amax))) * np.float32(127) == got


def test_file_layout(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"a": 127.0, "b": 1.0}, trt_version=100300,
                       algorithm="MinMaxCalibration")
    text = path.read_text()
    assert text == f"TRT-100300-MinMaxCalibration\na: 3f800000\nb: {scale_hex(1.0)}\n"
    assert read_cache(path)[1] == {"version": 100300, "algorithm": "MinMaxCalibration"}


def test_onnxruntime_trt_ep_reader_recovers_ranges(tmp_path):
    path = write_cache(tmp_path / "calib.cache", RANGES)
    got = ort_read_dynamic_range(path)
    assert list(got) == list(RANGES)
    for name, amax in RANGES.items():
        assert got[name] == expected_amax(amax), name


def test_onnxruntime_manual_decode_matches_struct_for_normal_scales():
    for amax in RANGES.values():
        if amax == 0:
            continue  # ORT's hand decoder reads 0x00000000 as 2**-127, not 0
        bits = int(scale_hex(amax), 16)
        assert ort_ieee754_to_float(bits) == hex_to_scale(scale_hex(amax))


def test_known_vectors():
    assert scale_hex(127.0) == "3f800000"
    assert hex_to_scale("3f800000") == 1.0
    (bits,) = struct.unpack(">I", struct.pack(">f", np.float32(1) / np.float32(127)))
    assert scale_hex(1.0) == f"{bits:08x}" == "3c010204"
    assert scale_hex(0.0) == "00000000"
    assert scale_hex(254.0) == "40000000"
    h = scale_hex(1e-36)  # subnormal float32 scale: still 8 zero-padded digits
    assert len(h) == 8 and h.startswith("00")
    assert hex_to_scale("3F800000") == 1.0  # upper case read too


def test_scale_hex_rejects_bad_amax():
    for bad in (float("nan"), float("inf"), -1.0, 1e39, "x", True):
        with pytest.raises(QuantOpsError):
            scale_hex(bad)
    for bad in ("xyz", "123456789", "", "-1"):
        with pytest.raises(QuantOpsError):
            hex_to_scale(bad)


@pytest.mark.parametrize("amax", [float("nan"), float("inf"), -0.5, 1e39])
def test_write_rejects_bad_amax_naming_tensor(tmp_path, amax):
    target = tmp_path / "c.cache"
    with pytest.raises(QuantOpsError, match="'bad_tensor'"):
        write_cache(target, {"ok": 1.0, "bad_tensor": amax})
    assert not target.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["conv:0", "a\nb", "a\rb", "", " lead", "trail ", 3])
def test_write_rejects_bad_names(tmp_path, name):
    target = tmp_path / "c.cache"
    with pytest.raises(QuantOpsError):
        write_cache(target, {name: 1.0})
    assert os.listdir(tmp_path) == []


def test_write_rejects_bad_header_fields(tmp_path):
    with pytest.raises(QuantOpsError, match="algorithm"):
        write_cache(tmp_path / "c.cache", {"a": 1.0}, algorithm="Percentile")
    for v in (0, -8601, "8601", True):
        with pytest.raises(QuantOpsError, match="trt_version"):
            write_cache(tmp_path / "c.cache", {"a": 1.0}, trt_version=v)
    assert os.listdir(tmp_path) == []


def _cache(tmp_path, text):
    p = tmp_path / "c.cache"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, lineno", [
    ("TRT-8601-EntropyCalibration2\ndata: 3f80000z\n", 2),       # malformed hex
    ("TRT-8601-EntropyCalibration2\na: 3f800000\nb: 123456789\n", 3),  # 9 digits
    ("TRT-8601-EntropyCalibration2\na: 3f800000\nb 3f800000\n", 3),    # no ':'
    ("TRT-8601-EntropyCalibration2\na: 3f800000\na: 3f800000\n", 3),   # listed twice
    ("TRT-8601-EntropyCalibration2\na: 7fc00000\n", 2),           # NaN scale
    ("TRT-8601-EntropyCalibration2\na: bf800000\n", 2),           # negative scale
    ("TRT-8601-EntropyCalibration2\na: b: 3f800000\n", 2),        # two ':'
    ("TRT-8601-EntropyCalibration2\n\na: 3f800000\n", 2),         # blank line
    ("data: 3f800000\n", 1),                                      # missing header
    ("TRT-EntropyCalibration2\ndata: 3f800000\n", 1),             # no version
    ("TRT-8601-Percentile\ndata: 3f800000\n", 1),                 # unknown algorithm
    ("", 1),                                                      # empty file
])
def test_read_rejects_malformed(tmp_path, text, lineno):
    p = _cache(tmp_path, text)
    with pytest.raises(QuantOpsError) as ei:
        read_cache(p)
    assert f"{p}:{lineno}:" in str(ei.value)


def test_read_accepts_crlf_and_short_hex(tmp_path):
    p = _cache(tmp_path, "TRT-8501-EntropyCalibration\r\na: 3F800000\r\nb:0\r\n")
    ranges, meta = read_cache(p)
    assert ranges == {"a": 127.0, "b": 0.0}
    assert meta == {"version": 8501, "algorithm": "EntropyCalibration"}


def test_read_missing_file(tmp_path):
    with pytest.raises(QuantOpsError, match="nope.cache"):
        read_cache(tmp_path / "nope.cache")


def test_failed_write_leaves_no_file_parent_is_file(tmp_path):
    parent = tmp_path / "regular"
    parent.write_text("x")
    with pytest.raises(QuantOpsError, match="regular"):
        write_cache(parent / "c.cache", {"a": 1.0})
    with pytest.raises(QuantOpsError):
        write_ranges_json(parent / "r.json", {"a": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["regular"]


def test_failed_replace_leaves_no_file_and_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "c.cache"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(QuantOpsError, match="disk full"):
        write_cache(target, {"a": 1.0})
    assert os.listdir(tmp_path) == []  # neither the target nor the temp file

    monkeypatch.undo()
    write_cache(target, {"a": 1.0})
    old = target.read_text()
    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(QuantOpsError):
        write_cache(target, {"a": 2.0})
    assert target.read_text() == old
    assert os.listdir(tmp_path) == ["c.cache"]


def test_ranges_json_round_trip(tmp_path):
    ranges = dict(RANGES, **{"name:with:colons": 3.5})  # JSON has no ':' restriction
    path = write_ranges_json(tmp_path / "r.json", ranges)
    assert json.loads(path.read_text()) == ranges
    got = read_ranges_json(path)
    assert got == ranges and list(got) == list(ranges)


@pytest.mark.parametrize("amax", [float("nan"), float("inf"), -1.0])
def test_ranges_json_write_rejects_bad_amax(tmp_path, amax):
    with pytest.raises(QuantOpsError, match="'t1'"):
        write_ranges_json(tmp_path / "r.json", {"t0": 1.0, "t1": amax})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, match", [
    ('{"a": 1.0,\n "b": }', r"r\.json:2:"),
    ('[1.0]', "JSON object"),
    ('{"a": NaN}', "NaN"),
    ('{"a": -1.0}', "'a'"),
    ('{"a": "1.0"}', "'a'"),
    ('{"a": true}', "'a'"),
    ('{"a": 1.0, "a": 2.0}', "twice"),
    ('{"a": 1e400}', "'a'"),
])
def test_ranges_json_read_rejects(tmp_path, text, match):
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(QuantOpsError, match=match) as ei:
        read_ranges_json(p)
    assert str(p) in str(ei.value)


def test_cache_and_json_agree(tmp_path):
    """The same ranges through both files give the same float32 ranges to a runtime."""
    cache, _ = read_cache(write_cache(tmp_path / "c.cache", RANGES))
    js = read_ranges_json(write_ranges_json(tmp_path / "r.json", RANGES))
    for name in RANGES:
        a, b = np.float32(cache[name]), np.float32(js[name])
        assert math.isclose(a, b, rel_tol=2 ** -22, abs_tol=0) or a == b, name
