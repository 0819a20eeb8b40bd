"""The library build reports what is wrong: compiler, mxnet version, compile errors."""

import pytest

from quant_ops import _build
from quant_ops.errors import BuildError


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(BuildError, match="no C\\+\\+ compiler found"):
        _build.find_compiler()


def test_wrong_mxnet_version_is_named(tmp_path):
    (tmp_path / "libinfo.py").write_text("__version__ = '2.0.0'\n")
    with pytest.raises(BuildError, match="needs mxnet 1.9.x.*found mxnet 2.0.0"):
        _build.check_mxnet(tmp_path)


def test_wheel_without_lib_api_is_named(tmp_path):
    (tmp_path / "libinfo.py").write_text("__version__ = '1.9.1'\n")
    with pytest.raises(BuildError, match="lacks include/mxnet/lib_api.h"):
        _build.check_mxnet(tmp_path)


def test_failed_build_leaves_no_library(tmp_path):
    src = tmp_path / "cxx"
    src.mkdir()
    (src / "broken.cc").write_text("this is not C++;\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="compiling the operator library failed"):
        _build.build(src, out)
    assert not (out / _build.LIB_NAME).exists()
    assert list(out.glob("*")) == []


def test_source_digest_follows_sources(tmp_path):
    src = tmp_path / "cxx"
    src.mkdir()
    (src / "a.cc").write_text("int a;\n")
    d1 = _build.source_digest(src, _build.mxnet_dir())
    (src / "a.cc").write_text("int b;\n")
    assert _build.source_digest(src, _build.mxnet_dir()) != d1
