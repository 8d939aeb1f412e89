#!/usr/bin/env bash
# Install what the tests need, lint the code with ruff (pyproject.toml's [tool.ruff]; a finding
# fails the script) and run the tests: unit tests (two workers), then the notebooks
# under nbval against their committed outputs and every chapter through papermill (smoke
# profile), one at a time: kernels started side by side under xdist were seen to hang;
# after them, in the same session, the metrics the nbval run wrote against the reference
# bands (tests/test_metric_bands.py); then the browser tests (the rendered chapter in
# headless Chromium, a notebook in JupyterLab).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh test
export PYTHONHASHSEED=0
python -m ruff check companion tests benchmarks conftest.py notebooks
# pytest exits 5 when a -k filter leaves a step with nothing to run: that step passes
run() { python -m pytest "$@" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }; }
run -n 2 --dist loadfile -m "not notebook and not browser" tests "$@"
run \
    --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
    --nbval-cell-timeout 1200 --durations=12 tests/test_notebooks.py notebooks \
    tests/test_metric_bands.py "$@"
run -m browser tests/test_browser.py "$@"
