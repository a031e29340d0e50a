#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned build + test dependencies into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[build,test]"
