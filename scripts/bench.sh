#!/usr/bin/env bash
# Benchmarks Switchyard beside bare baselines in one run (see docs/BENCHMARKS.md).
# Pass --quick for a short smoke run, --functions-only for the managed functions (g), --deploy-only for deploys through the control plane (i), --kafka-only for the Kafka part (e) alone, --objects-only for the object-store part (f), --queues-only for SQS, RabbitMQ and MQTT (j), --telemetry-only for traces off vs on (k), --logs-only for a quiet function beside a noisy one (l), --poll-memory for the
# polling memory against bucket size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh bench
cargo build --release --locked -p switchyard -p switchyard-bench
cargo build --release --locked --quiet --manifest-path examples/lambda-rust/Cargo.toml
"$CARGO_TARGET_DIR/release/switchyard-bench" "$@"
