#!/usr/bin/env bash
# The test command: set-up (idempotent), the embedded model's files, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
twinquant-prepare --output models
python -m pytest -q "$@"
