#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests on lab clusters
# of real PostgreSQL hosts. As root (and in CI) the hosts are network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgwarden-target}"

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The lab tests start the agent binary: build the binaries first.
cargo build --workspace
# Lab tests run one at a time: each one is a cluster of three PostgreSQL servers.
cargo test --workspace -- --test-threads=1
