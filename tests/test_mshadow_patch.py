"""Check 3rdparty_patches/mshadow_maxall_except_dim.patch against the mshadow
headers shipped in the installed mxnet wheel.

The patch is copied onto a scratch copy of the wheel's headers, a small C++
program using ``maxall_except_dim`` is compiled against it, and its output is
compared with numpy.  The program must *not* compile against the pristine
headers, otherwise the test would prove nothing.
"""
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "3rdparty_patches" / "mshadow_maxall_except_dim.patch"
HEADER = Path("mshadow") / "extension" / "reduceto1d.h"
SHAPE = (3, 4, 5, 6)

# mshadow defaults to MKL (mkl_blas.h) and CUDA (cuda.h); turn both off, and
# CBLAS/SSE too, so the headers compile standalone on a plain CPU toolchain.
CXXFLAGS = [
    "-std=c++17", "-O1",
    "-DMSHADOW_USE_CBLAS=0", "-DMSHADOW_USE_MKL=0",
    "-DMSHADOW_USE_CUDA=0", "-DMSHADOW_USE_SSE=0",
]

CPP_SOURCE = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "mshadow/tensor.h"

using namespace mshadow;
using namespace mshadow::expr;

struct abs_op {
  MSHADOW_XINLINE static float Map(float a) { return std::fabs(a); }
};

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  const index_t n = 3, c = 4, h = 5, w = 6;
  std::vector<float> in(n * c * h * w);
  FILE *fi = std::fopen(argv[1], "rb");
  if (!fi || std::fread(in.data(), sizeof(float), in.size(), fi) != in.size()) return 3;
  std::fclose(fi);
  Tensor<cpu, 4, float> src(in.data(), Shape4(n, c, h, w));

  // Pre-fill outputs with a sentinel so that untouched entries are visible.
  std::vector<float> o0(n, 12345.f), o1(c, 12345.f), o2(h, 12345.f),
      o3(w, 12345.f), oabs(c, 12345.f);
  Tensor<cpu, 1, float> d0(o0.data(), Shape1(n));
  Tensor<cpu, 1, float> d1(o1.data(), Shape1(c));
  Tensor<cpu, 1, float> d2(o2.data(), Shape1(h));
  Tensor<cpu, 1, float> d3(o3.data(), Shape1(w));
  Tensor<cpu, 1, float> dabs(oabs.data(), Shape1(c));

  d0 = maxall_except_dim<0>(src);
  d1 = maxall_except_dim<1>(src);
  d2 = maxall_except_dim<2>(src);
  d3 = maxall_except_dim<3>(src);
  // Per-channel max |x|: the reduction the quantization operators need.
  dabs = maxall_except_dim<1>(F<abs_op>(src));

  FILE *fo = std::fopen(argv[2], "wb");
  if (!fo) return 4;
  for (const std::vector<float> *v : {&o0, &o1, &o2, &o3, &oabs})
    std::fwrite(v->data(), sizeof(float), v->size(), fo);
  std::fclose(fo);
  return 0;
}
"""


def _mxnet_include_dir():
    spec = importlib.util.find_spec("mxnet")
    assert spec is not None and spec.origin, "mxnet is not installed"
    inc = Path(spec.origin).parent / "include"
    assert (inc / HEADER).is_file(), "mshadow headers not found under %s" % inc
    return inc


def _copy_headers(dst):
    """Copy the wheel's mshadow and dmlc header trees (all mshadow needs)."""
    inc = _mxnet_include_dir()
    dst.mkdir()
    for name in ("mshadow", "dmlc"):
        shutil.copytree(inc / name, dst / name)
    return dst


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def tools():
    found = {name: shutil.which(name) for name in ("patch", "g++")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip("required program(s) not on PATH: %s" % ", ".join(missing))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tools):
    """Pristine and patched copies of the headers plus the test program."""
    root = tmp_path_factory.mktemp("mshadow_patch")
    pristine = _copy_headers(root / "pristine")
    patched = _copy_headers(root / "patched")

    dry = _run([tools["patch"], "-p1", "--dry-run", "-i", str(PATCH)], cwd=patched)
    assert dry.returncode == 0, "patch --dry-run failed:\n" + dry.stdout + dry.stderr
    real = _run([tools["patch"], "-p1", "-i", str(PATCH)], cwd=patched)
    assert real.returncode == 0, "patch failed:\n" + real.stdout + real.stderr
    assert not list(patched.rglob("*.rej")) and not list(patched.rglob("*.orig")), \
        "patch did not apply cleanly:\n" + real.stdout

    src = root / "maxall.cc"
    src.write_text(CPP_SOURCE)
    return {"root": root, "pristine": pristine, "patched": patched, "src": src}


def test_patch_file_layout():
    text = PATCH.read_text()
    assert "--- a/mshadow/extension/reduceto1d.h" in text
    assert "+++ b/mshadow/extension/reduceto1d.h" in text


def test_pristine_header_lacks_maxall(workdir):
    text = (workdir["pristine"] / HEADER).read_text()
    assert "maxall_except_dim" not in text
    assert "sumall_except_dim" in text
    # The reducer the patch relies on must exist in this mshadow.
    assert "struct maximum" in (workdir["pristine"] / "mshadow" / "base.h").read_text()


def test_patched_header_has_maxall(workdir):
    text = (workdir["patched"] / HEADER).read_text()
    assert "maxall_except_dim(const Exp<SrcExp, DType, etype> &exp)" in text
    assert "red::maximum" in text


def test_does_not_compile_without_patch(workdir, tools):
    res = _run([tools["g++"], *CXXFLAGS, "-fsyntax-only",
                "-I" + str(workdir["pristine"]), str(workdir["src"])])
    assert res.returncode != 0, "program unexpectedly compiled against pristine mshadow"
    assert "maxall_except_dim" in res.stderr


def test_maxall_except_dim_matches_numpy(workdir, tools):
    root = workdir["root"]
    exe = root / "maxall"
    res = _run([tools["g++"], *CXXFLAGS, "-I" + str(workdir["patched"]),
                str(workdir["src"]), "-o", str(exe)])
    assert res.returncode == 0, "compile failed:\n" + res.stderr

    rng = np.random.RandomState(1234)
    # All-negative data: a max that started from 0 instead of -inf (or that
    # read an uninitialised output) would be wrong for every dimkeep.
    negative = rng.uniform(-100.0, -0.5, size=SHAPE).astype(np.float32)
    # Mixed signs: |x| and x then give different per-channel maxima.
    mixed = rng.uniform(-50.0, 50.0, size=SHAPE).astype(np.float32)
    mixed[:, 1] -= 60.0  # keep one channel strictly negative

    for label, x in (("negative", negative), ("mixed", mixed)):
        inp, out = root / ("in_%s.bin" % label), root / ("out_%s.bin" % label)
        x.tofile(inp)
        run = _run([str(exe), str(inp), str(out)])
        assert run.returncode == 0, \
            "program failed on %s input (rc=%d):\n%s" % (label, run.returncode, run.stderr)
        got = np.fromfile(out, dtype=np.float32)

        expected = []
        for keep in range(4):
            axes = tuple(a for a in range(4) if a != keep)
            expected.append(("dimkeep=%d" % keep, x.max(axis=axes)))
        expected.append(("abs, dimkeep=1", np.abs(x).max(axis=(0, 2, 3))))
        assert got.size == sum(e.size for _, e in expected)

        offset = 0
        for name, exp in expected:
            np.testing.assert_array_equal(got[offset:offset + exp.size], exp,
                                          err_msg="%s input, %s" % (label, name))
            offset += exp.size

    assert (negative.max(axis=(1, 2, 3)) < 0).all()  # sanity: exercises negatives
