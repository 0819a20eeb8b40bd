"""Install ``quant_ops`` and build ``operator_cxx/`` against the installed mxnet's headers.

mxnet must already be installed (its wheel ships ``lib_api.h``/``lib_api.cc``), so install
with ``pip install --no-build-isolation .`` (``scripts/setup.sh`` does).
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _builder():
    # quant_ops/_build.py imports neither mxnet nor the package, so it loads standalone.
    sys.path.insert(0, str(ROOT / "quant_ops"))
    spec = importlib.util.spec_from_file_location("_qo_build", ROOT / "quant_ops" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildWithLibrary(build_py):
    """Compile the operator library into the built package (``quant_ops/lib``)."""

    def run(self):
        super().run()
        b = _builder()
        try:
            b.build(ROOT / "operator_cxx", Path(self.build_lib) / "quant_ops" / "lib")
        except b.BuildError as e:
            sys.exit(f"error: {e}")


setup(
    name="quant_ops",
    version="0.1.0",
    description="TensorRT-aligned quantization toolkit (QAT, PTQ, export) for MXNet 1.9",
    packages=find_packages(include=["quant_ops", "quant_ops.*"]),
    package_data={"quant_ops": ["presets.yaml"]},
    python_requires=">=3.8",
    install_requires=["mxnet==1.9.1", "numpy==1.23.5", "tqdm", "pyyaml"],
    cmdclass={"build_py": BuildWithLibrary},
    entry_points={"console_scripts": ["qo-graph-optimize=quant_ops.cli.graph_optimize:main",
                                      "qo-export-onnx=quant_ops.cli.export_onnx:main",
                                      "qo-dfq=quant_ops.cli.dfq:main",
                                      "qo-easyquant=quant_ops.cli.easyquant:main",
                                      "qo-adaround=quant_ops.cli.adaround:main",
                                      "qo-mixed-precision=quant_ops.cli.mixed_precision:main",
                                      "qo-sensitivity=quant_ops.cli.sensitivity:main",
                                      "qo-qat-train=quant_ops.cli.qat_train:main"]},
    zip_safe=False,
)
