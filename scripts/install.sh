#!/usr/bin/env bash
# Create .venv and install ccsr with everything the server and the tests need. Idempotent.
# torch is installed FIRST and pinned, so no dependency can pull a multi-GB CUDA build onto a CPU machine;
# on a GPU machine set CCSR_TORCH (e.g. CCSR_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.ccsr-installed
if [[ -f $STAMP && $STAMP -nt pyproject.toml ]]; then exit 0; fi
say() { echo "install.sh: $*" >&2; }  # one line per stage: the first install takes minutes
say "installing ccsr into $PWD/.venv (once; several minutes, most of it torch)"
[[ -x .venv/bin/python ]] || { say "creating the virtual environment with $PY"; "$PY" -m venv .venv; }
. .venv/bin/activate
say "upgrading pip"
python -m pip install -q --upgrade pip
say "installing ${CCSR_TORCH:-torch==2.13.0} (the CPU wheel unless CCSR_TORCH says otherwise)"
# shellcheck disable=SC2086
python -m pip install -q ${CCSR_TORCH:-torch==2.13.0}
say "installing ccsr with its server, scale-out and test dependencies"
python -m pip install -q -e ".[server,scale,dev]"
touch "$STAMP"
say "done: $(python -m ccsr.cli --version)"
