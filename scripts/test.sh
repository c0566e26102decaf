#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, and every
# test (unit tests and end-to-end tests against a real nats-server).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh
echo "== building the Rust Lambda example (examples/lambda-rust)" >&2
cargo build --release --locked --quiet --manifest-path examples/lambda-rust/Cargo.toml
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
cargo fmt --manifest-path examples/lambda-rust/Cargo.toml -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --release --locked --quiet --manifest-path examples/lambda-rust/Cargo.toml -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked "$@"
