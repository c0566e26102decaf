#!/usr/bin/env bash
# Benchmarks Switchyard beside bare baselines in one run (see docs/BENCHMARKS.md).
# Pass --quick for a short smoke run, --kafka-only for the Kafka part (e) alone, --objects-only for the object-store part (f), --poll-memory for the
# polling memory against bucket size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh all
cargo build --release --locked -p switchyard -p switchyard-bench
"$CARGO_TARGET_DIR/release/switchyard-bench" "$@"
