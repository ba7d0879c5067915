#!/bin/sh
# Builds {{name}}.wasm, a pgstream-host handler component, from app.py (and pgstream.py next
# to it) against the WIT contract in wit/.
#
# Environment:
#   COMPONENTIZE_PY   the componentize-py command (default: componentize-py on PATH;
#                     install it with `pip install componentize-py==0.25.1`)
#   PYTHON_PATH       extra folders holding pure-Python packages the handler imports,
#                     separated by ':' (e.g. a venv's site-packages); default: none
set -eu
cd "$(dirname "$0")"
COMPONENTIZE_PY="${COMPONENTIZE_PY:-componentize-py}"
extra=""
if [ -n "${PYTHON_PATH:-}" ]; then
    old_ifs=$IFS
    IFS=:
    for dir in $PYTHON_PATH; do
        extra="$extra -p $dir"
    done
    IFS=$old_ifs
fi
# shellcheck disable=SC2086 # $extra is a list of options
"$COMPONENTIZE_PY" -d wit -w handler componentize -p . $extra app -o {{name}}.wasm
echo "built {{name}}.wasm"
