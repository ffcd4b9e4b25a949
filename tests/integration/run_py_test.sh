#!/usr/bin/env bash
# Runs a Python integration test with Debian's interpreter (the one that has python3-torch and
# python3-yaml), whatever `python3` is first on PATH.
set -euo pipefail
script="$1"
shift
export PYTHONPATH="$(dirname "$script")${PYTHONPATH:+:$PYTHONPATH}"
exec /usr/bin/python3 "$script" "$@"
