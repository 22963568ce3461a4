#!/usr/bin/env bash
# Fuzz every parser and decoder of outside bytes for a fixed budget, and print executions and
# faults per target (README "Reliability" quotes the last full run).
#
#   bash benches/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Rust: the cargo fuzz targets of rust/theta-core/fuzz (libFuzzer + AddressSanitizer), built into
# their own target directory (THETA_FUZZ_TARGET_DIR, default target/fuzz) so the release build
# is left alone. Python: benches/fuzz_targets.py under atheris. Seeds are made from
# tests/fixtures; corpora and fault inputs go to bench-out/fuzz/. A fault is a crash, a failed
# check, a hang (-timeout) or an allocation over the cap (Rust -malloc_limit_mb, Python an
# address-space limit); each one becomes a test (tests/test_fuzz_regressions.py) and a fix.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${1:-60}
shift || true
OUT=$ROOT/bench-out/fuzz
TARGET_DIR=${THETA_FUZZ_TARGET_DIR:-$ROOT/target/fuzz}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
RUST_TARGETS=(frame frame_roundtrip ans read_chunks pack_blob pktline)
PY_TARGETS=$(python3 -c "import sys; sys.path.insert(0, 'benches'); import fuzz_targets; print(' '.join(fuzz_targets.TARGETS))")
WANT=("$@")
wanted() { [ ${#WANT[@]} -eq 0 ] || [[ " ${WANT[*]} " == *" $1 "* ]]; }

command -v cargo-fuzz >/dev/null || cargo install -q cargo-fuzz --locked
python3 -c "import atheris" 2>/dev/null || python3 -m pip install -q "atheris>=2.3,<4"  # the `fuzz` extra of pyproject.toml

mkdir -p "$OUT/seeds" "$OUT/corpus" "$OUT/artifacts" "$OUT/logs"
echo "== build (seeds, then the fuzz targets with ASan; nightly flags through RUSTC_BOOTSTRAP=1)" >&2
(cd rust/theta-core/fuzz && CARGO_TARGET_DIR=$TARGET_DIR cargo run -q --release --example seeds -- "$ROOT/tests/fixtures" "$OUT/seeds")
(cd rust/theta-core && RUSTC_BOOTSTRAP=1 cargo fuzz build -O --target-dir "$TARGET_DIR" 2>"$OUT/logs/build.log")
BIN=$TARGET_DIR/x86_64-unknown-linux-gnu/release

faults_of() { find "$OUT/artifacts" -maxdepth 1 -name "$1-*" 2>/dev/null | wc -l; }
execs_of() {
  # libFuzzer's final stats, else its last status line (a run stopped by a fault prints no stats)
  local n
  n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$1" | tail -1 | grep -o '[0-9]*$' || true)
  [ -n "$n" ] || n=$(grep -oE '^#[0-9]+' "$1" | tail -1 | tr -d '#' || true)
  echo "${n:-0}"
}

printf '%-8s %-15s %12s %7s\n' side target executions faults | tee "$OUT/summary.txt"
total_execs=0
total_faults=0
report() {
  printf '%-8s %-15s %12s %7s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/summary.txt"
  total_execs=$((total_execs + $3))
  total_faults=$((total_faults + $4))
}

for t in "${RUST_TARGETS[@]}"; do
  wanted "$t" || continue
  before=$(faults_of "rust-$t")
  mkdir -p "$OUT/corpus/rust-$t"
  log=$OUT/logs/rust-$t.log
  THETA_FUZZ_TMP=${THETA_FUZZ_TMP:-/dev/shm} "$BIN/$t" "$OUT/corpus/rust-$t" "$OUT/seeds/$t" \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -artifact_prefix="$OUT/artifacts/rust-$t-" -print_final_stats=1 >"$log" 2>&1 || true
  report rust "$t" "$(execs_of "$log")" $(($(faults_of "rust-$t") - before))
done

for t in $PY_TARGETS; do
  wanted "$t" || continue
  before=$(faults_of "py-$t")
  log=$OUT/logs/py-$t.log
  PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH} timeout $((SECS + 300)) \
    python3 benches/fuzz_targets.py "$t" "$SECS" "$OUT/corpus/py-$t" "$OUT/artifacts" >"$log" 2>&1 || true
  report python "$t" "$(execs_of "$log")" $(($(faults_of "py-$t") - before))
done

printf '%-8s %-15s %12s %7s\n' all total "$total_execs" "$total_faults" | tee -a "$OUT/summary.txt"
echo "fault inputs (if any): $OUT/artifacts; logs: $OUT/logs" >&2
