#!/usr/bin/env bash
# Install what the book needs, run every chapter (profile default, or $PROFILE) with
# papermill, then render the executed chapter to HTML. Extra arguments go to `book run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh book
profile="${PROFILE:-default}"
python -m companion book run --profile "$profile" "$@"
python -m companion book html --profile "$profile"
