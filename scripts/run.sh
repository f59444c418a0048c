#!/usr/bin/env bash
# Install if needed, then run ccsr (default: the server with the web playground on http://127.0.0.1:8000).
# The first run downloads the released CCSR-v1 weights once (progress bar, cached by huggingface_hub).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
. .venv/bin/activate
if [[ $# -eq 0 ]]; then
  set -- serve
  echo "run.sh: ccsr serve on http://127.0.0.1:8000 (the first start downloads the CCSR-v1 weights once, with a progress bar)" >&2
fi
exec ccsr "$@"
