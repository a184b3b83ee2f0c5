#!/usr/bin/env bash
# The test command: Rust unit and property tests, then the Python tests (CPU; `gpu` tests skip
# without CUDA). Needs `bash scripts/setup.sh --no-run` (or the full setup) first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
cargo test --release --quiet
python -m pytest -q -p no:cacheprovider "$@"
