#!/usr/bin/env bash
# Prints the path of the Envoy binary that scripts/setup.sh installed into .venv ($ENVOY_BIN wins).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${ENVOY_BIN:-}" ]; then echo "$ENVOY_BIN"; exit 0; fi
.venv/bin/python -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))'
