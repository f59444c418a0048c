#!/usr/bin/env bash
# Install if needed, lint, then run the whole test suite (CPU only, no downloads, ~15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
. .venv/bin/activate
ruff check src tests bench
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python -m pytest -q --durations=15 "$@"
