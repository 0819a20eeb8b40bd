#!/usr/bin/env bash
# Set up, then run the main job on the bundled data (Fashion-MNIST from Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/qat_fashion_mnist.py --out out/qat_fashion_mnist "$@"
