#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what a command needs.
# Usage: source scripts/bootstrap.sh EXTRA   (EXTRA: book or test)
# Environment: VENV (default .venv), PYTHON (default python3),
#   TORCH_SPEC (default torch==2.13.0; set e.g. TORCH_SPEC="torch>=2.4" for another build).
set -euo pipefail
extra="${1:?usage: source scripts/bootstrap.sh book|test}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python 3.11 or newer is needed (found $("$python" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment $venv"
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.companion-$extra-$(cat "$root/pyproject.toml" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    # torch first, pinned by default to one release (a CPU wheel is on disk here, so this
    # is fast); the project itself only asks for torch>=2.4, satisfied by any build.
    if ! python -c 'import torch' 2>/dev/null; then
        python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    fi
    python -m pip install --quiet -e "$root[$extra]"
    touch "$stamp"
fi
# The browser tests need Debian's Chromium and its driver; install them where we can.
if [ "$extra" = test ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium and chromium-driver for the browser tests"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1; then
            echo "warning: could not install chromium; the browser tests will be skipped" >&2
        fi
    else
        echo "note: no chromium found; the browser tests will be skipped (install the" \
             "Debian packages chromium and chromium-driver, or your system's equivalent)" >&2
    fi
fi
