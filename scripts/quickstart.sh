#!/usr/bin/env bash
# Runs Switchyard with the default configuration: installs nats-server if missing,
# starts one (JetStream, data under the cache) when none answers on NATS_URL, builds
# Switchyard, and runs it. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh quickstart

NATS_URL="${NATS_URL:-nats://127.0.0.1:4222}"
export NATS_URL
host_port="${NATS_URL#nats://}"
host="${host_port%%:*}"
port="${host_port##*:}"
nats_pid=""
if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    store="$SWITCHYARD_CACHE/quickstart-jetstream"
    mkdir -p "$store"
    echo "no nats-server at $NATS_URL; starting one (store: $store)" >&2
    "$SWITCHYARD_NATS_SERVER" --jetstream --store_dir "$store" --addr "$host" --port "$port" >"$SWITCHYARD_CACHE/quickstart-nats.log" 2>&1 &
    nats_pid=$!
    trap '[ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && break
        sleep 0.1
    done
fi

cargo build --release --locked -p switchyard
cat >&2 <<'TRY'

Switchyard is starting. In another terminal, try:

  curl -i -X POST http://127.0.0.1:8080/hooks/demo -H 'Content-Type: application/json' -d '{"hello":"world"}'

  curl -i -X POST http://127.0.0.1:8080/v1/events \
       -H 'ce-specversion: 1.0' -H 'ce-id: 1' -H 'ce-source: /curl' -H 'ce-type: com.example.hello' \
       -H 'Content-Type: text/plain' -d 'hi'

The event is printed below by the `print` function. Health and metrics:
  curl http://127.0.0.1:9090/readyz    curl http://127.0.0.1:9090/metrics

TRY
"$CARGO_TARGET_DIR/release/switchyard" run --config "${SWITCHYARD_CONFIG:-config/switchyard.toml}"
