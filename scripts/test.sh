#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs
# formatting checks, unit tests and integration tests with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh test

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
fi
# Every parser of peer input, fuzzed briefly from its seeds (WEIR_FUZZ_SECONDS each).
scripts/fuzz-ci.sh "${WEIR_FUZZ_SECONDS:-10}"
cargo test --workspace --locked
