#!/usr/bin/env bash
# Install what the tests need and run them all: unit tests, the notebooks under nbval
# against their committed outputs, and every chapter through papermill (smoke profile).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh test
export PYTHONHASHSEED=0
python -m pytest -n 2 --dist loadfile \
    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
    tests notebooks "$@"
