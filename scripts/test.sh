#!/usr/bin/env bash
# Set up, check lint and types, then run the whole test suite (CPU; GPU/TensorRT tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .   # rules in pyproject.toml
.venv/bin/mypy           # runtime/ and calibration/, strictness in pyproject.toml
.venv/bin/python -m pytest -q "$@"
