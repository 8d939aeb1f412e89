#!/usr/bin/env bash
# Install what the tests need and run them all: unit tests (two workers), then the notebooks
# under nbval against their committed outputs and every chapter through papermill (smoke
# profile), one at a time: kernels started side by side under xdist were seen to hang.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh test
export PYTHONHASHSEED=0
python -m pytest -n 2 --dist loadfile -m "not notebook" tests "$@"
python -m pytest \
    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
    --nbval-cell-timeout 1200 --durations=12 tests/test_notebooks.py notebooks "$@"
