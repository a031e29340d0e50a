#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU; GPU/TensorRT tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
