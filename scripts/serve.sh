#!/usr/bin/env bash
# Runs the server with embedded defaults: no configuration file, a development app
# with fresh keys is generated, written to ./weir-dev.toml and printed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh build
exec cargo run --release --locked -- serve "$@"
