#!/usr/bin/env bash
# CI, second tier: the fast tests (-m "not slow") on Python 3.12 with the NEWEST megatron-core release, in a
# virtual environment of their own (.venv-py312/, git-ignored; reused when it is a Python 3.12 one). pip
# resolves megatron-core>=0.16.1 to the newest release on 3.12, as it does for users, so the next release
# that breaks something fails here first. On 3.12 torch==2.13.0 is PyPI's CUDA build (with its nvidia-*
# wheels, ~4.5 GB): it runs on the CPU, and no CPU-only wheel for 3.12 is on PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-py312

find_python312() {
    # PYTHON312 if set; else pyenv's newest 3.12 (the CI machines'); else a python3.12 on PATH that runs.
    local prefix
    if [ -n "${PYTHON312:-}" ]; then
        echo "$PYTHON312"
    elif command -v pyenv >/dev/null && prefix=$(pyenv prefix 3.12 2>/dev/null); then
        echo "$prefix/bin/python"
    elif python3.12 -c "" 2>/dev/null; then
        command -v python3.12
    else
        echo "py312.sh: no Python 3.12 found: install it (pyenv install 3.12) or set PYTHON312" >&2
        return 1
    fi
}

is_python312() {
    "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null
}

start=$SECONDS
if ! is_python312 "$VENV/bin/python"; then
    python312=$(find_python312)
    rm -rf "$VENV"
    "$python312" -m venv "$VENV"
fi
# --upgrade megatron-core: a venv made before a megatron-core release must still test the newest one.
"$VENV/bin/python" -m pip install --quiet --upgrade -e ".[test]" megatron-core
"$VENV/bin/python" - <<'PY'
import sys
from importlib.metadata import version

print(f"py312.sh: Python {sys.version.split()[0]}, megatron-core {version('megatron-core')}, "
      f"torch {version('torch')}, transformers {version('transformers')}")
PY
echo "py312.sh: venv ready in $((SECONDS - start)) s"
# The venv's bin first on PATH, as `activate` would: tests call console scripts and shellcheck by name.
PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -m "not slow"
echo "py312.sh: fast tier passed; $((SECONDS - start)) s in all"
