#!/usr/bin/env bash
# Creates .venv (once) and installs the pinned build, test and app dependencies into it, and Debian's chromium
# for the app's browser tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[build,test,app]"
# The app's browser tests drive Debian's chromium (headless); install it when missing and we may.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: chromium is not installed (as root: apt-get install chromium); tests/test_app.py will skip" >&2
    fi
fi
