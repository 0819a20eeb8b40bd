#!/usr/bin/env bash
# Set up a fresh machine (Debian, run as root) for quant_ops: system packages, a virtual
# environment at .venv with the pinned dependencies, and the package with its C++ library.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(g++ patch graphviz dataset-fashion-mnist)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] pip install -r requirements.txt"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps gluoncv==0.10.5.post0
  echo "$want" > "$stamp"
fi
# The checkout itself is the installed package (a .pth entry, as an editable install makes);
# `pip install --no-build-isolation .` makes a regular install instead.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/quant_ops_checkout.pth"
# Builds (or re-builds, when operator_cxx/ changed) the library and checks it loads.
.venv/bin/python -c "import quant_ops, mxnet as mx; mx.nd.Quantization_int8" \
  || { echo "[setup] quant_ops failed to import" >&2; exit 1; }
echo "[setup] ok"
