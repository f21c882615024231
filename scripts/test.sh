#!/usr/bin/env bash
# The test command: set-up (idempotent), the embedded model's files, lint (ruff, configured in pyproject.toml),
# then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
twinquant-prepare --output models
ruff check .
python -m pytest -q "$@"
