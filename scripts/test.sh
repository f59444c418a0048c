#!/usr/bin/env bash
# Install if needed, lint, then run the whole test suite (CPU only, no downloads, ~15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
# The playground's browser tests drive Debian's Chromium through its ChromeDriver (no browser download).
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  SUDO=$([[ $(id -u) -eq 0 ]] && echo "" || echo "sudo")
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
. .venv/bin/activate
ruff check src tests bench
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python -m pytest -q --durations=15 "$@"
