"""Compile ``operator_cxx/`` into the shared library that ``mx.library.load`` takes.

Imported by ``setup.py`` (before the package is installed) and by ``_lib`` (to build a
missing or stale library in a source checkout), so it must not import mxnet or numpy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    from .errors import BuildError
except ImportError:  # loaded by setup.py as a plain module, before the package exists
    from errors import BuildError  # type: ignore[no-redef]

LIB_NAME = "libquant_ops.so"
SUPPORTED_MXNET = "1.9"
# x86-64-v2 is the portable floor (SSE4.1 rounds vectors); hot loops carry AVX2 clones.
# -ffp-contract=off keeps a*b+c unfused so results match the numpy reference bit for bit.
BASE_FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fPIC", "-ffp-contract=off", "-Wall",
              "-Wno-unused-function"]
ARCH_FLAGS = {"x86_64": ["-march=x86-64-v2"]}
# lib_api.cc's error-message entry points under other names: operator_cxx/error_channel.cc
# answers MXNet per thread and falls back to them
LIB_API_FLAGS = ["-D_msgSize=qo_lib_api_msgSize", "-D_msgGet=qo_lib_api_msgGet"]


def mxnet_dir() -> Path:
    """Folder of the installed mxnet package, found without importing it."""
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("mxnet is not installed: pip install mxnet==1.9.1 (numpy==1.23.5) "
                         "before building quant_ops")
    return Path(list(spec.submodule_search_locations)[0])


def mxnet_version(mx_dir: Path) -> str:
    libinfo = mx_dir / "libinfo.py"
    for line in libinfo.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    raise BuildError(f"cannot read the mxnet version from {libinfo}")


def check_mxnet(mx_dir: Path) -> None:
    version = mxnet_version(mx_dir)
    if not version.startswith(SUPPORTED_MXNET + "."):
        raise BuildError(f"quant_ops needs mxnet {SUPPORTED_MXNET}.x (lib_api.h version 11), "
                         f"found mxnet {version} at {mx_dir}")
    for need in ("include/mxnet/lib_api.h", "src/lib_api.cc"):
        if not (mx_dir / need).is_file():
            raise BuildError(f"the mxnet wheel at {mx_dir} lacks {need}; reinstall mxnet==1.9.1")


def find_compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        raise BuildError("no C++ compiler found (set CXX or install g++: apt-get install g++)")
    return cxx


def sources(cxx_dir: Path) -> list[Path]:
    return sorted(cxx_dir.glob("*.cc"))


def source_digest(cxx_dir: Path, mx_dir: Path) -> str:
    """Hash of every source and header, plus the mxnet version: a stale library rebuilds."""
    h = hashlib.sha256(mxnet_version(mx_dir).encode())
    h.update(" ".join(BASE_FLAGS + LIB_API_FLAGS).encode())   # how it is built, too
    for f in sorted(p for p in cxx_dir.rglob("*") if p.suffix in (".cc", ".h")):
        h.update(str(f.relative_to(cxx_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"compiling the operator library failed:\n$ {' '.join(cmd)}\n"
                         f"{proc.stderr[-4000:]}")


def build(cxx_dir: Path, out_dir: Path, jobs: int | None = None) -> Path:
    """Compile every ``*.cc`` of ``cxx_dir`` with mxnet's ``lib_api.cc`` into out_dir/LIB_NAME.

    Objects are compiled in parallel; the library is linked to a temporary name and renamed,
    so a failed build never leaves a broken library behind.
    """
    mx_dir = mxnet_dir()
    check_mxnet(mx_dir)
    cxx = find_compiler()
    machine = os.uname().machine
    flags = BASE_FLAGS + ARCH_FLAGS.get(machine, [])
    incs = [f"-I{mx_dir / 'include'}", f"-I{cxx_dir}"]
    # digest first: a source that changes during the build makes the library stale, not current
    digest = source_digest(cxx_dir, mx_dir)
    srcs = sources(cxx_dir) + [mx_dir / "src" / "lib_api.cc"]
    if len(srcs) < 2:
        raise BuildError(f"no operator sources (*.cc) found in {cxx_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qo_build_") as tmp:
        objs = [Path(tmp) / f"{i}_{s.stem}.o" for i, s in enumerate(srcs)]
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            list(pool.map(lambda so: _run(
                [cxx, *flags, *(LIB_API_FLAGS if so[0].name == "lib_api.cc" else []), *incs,
                 "-c", str(so[0]), "-o", str(so[1])]), zip(srcs, objs)))
        tmp_lib = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
        try:
            _run([cxx, "-shared", "-fopenmp", *[str(o) for o in objs], "-o", str(tmp_lib)])
            os.replace(tmp_lib, out_dir / LIB_NAME)
        finally:
            tmp_lib.unlink(missing_ok=True)
    (out_dir / (LIB_NAME + ".digest")).write_text(digest)
    return out_dir / LIB_NAME


if __name__ == "__main__":  # python -m quant_ops._build <operator_cxx> <out_dir>
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
