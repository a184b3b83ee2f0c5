#!/usr/bin/env bash
# The test command: the style gates, Rust unit and property tests, then the Python tests (CPU; `gpu`
# tests skip without CUDA). Needs `bash scripts/setup.sh --no-run` (or the full setup) first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

# Gates first: a style failure should not wait for the tests.
cargo fmt --check
# Clippy runs in the dev profile, not --release: a check emits metadata only, so it shares almost
# nothing with the fat-LTO test build (at most zstd-sys's build-script output). Measured
# on 2 shared cores from a clean target/, two runs: dev 76 and 90 s, --release 126 and 111 s; and
# `cargo test --release` took as long after a --release clippy as from nothing (225 s, 228 s).
cargo clippy --all-targets --quiet -- -D warnings
# The PyO3 bindings (rust/py.rs) only compile with the feature; +46 s, the rest is reused.
cargo clippy --all-targets --features python --quiet -- -D warnings
ruff check python tests benches
ruff format --check python tests benches
mypy

cargo test --release --quiet
python -m pytest -q -p no:cacheprovider "$@"
