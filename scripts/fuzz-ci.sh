#!/usr/bin/env bash
# Runs every fuzz target briefly (scripts/fuzz-ci.sh [SECONDS], 10 by default), from
# the seeds kept in fuzz/seeds/, so a regression of any parser of peer input fails
# the run. The corpus it grows is thrown away; long campaigns use scripts/fuzz.sh.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-10}
export RUSTC_BOOTSTRAP=1   # cargo-fuzz's sanitizer flags on the stable toolchain
cargo fuzz build --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for src in fuzz_targets/*.rs; do
  target=$(basename "$src" .rs)
  mkdir -p "$work/$target"
  if cargo fuzz run --release "$target" "$work/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=1024 \
      -artifact_prefix="$work/" >"$work/$target.log" 2>&1; then
    echo "fuzz $target: $(grep -o 'Done [0-9]* runs' "$work/$target.log" | tail -1) in ${seconds} s, no crash"
  else
    echo "fuzz $target: FAILED"
    tail -40 "$work/$target.log"
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that crashed: ${failed[*]}" >&2
  exit 1
fi
