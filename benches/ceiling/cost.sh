#!/usr/bin/env bash
# What hyper alone costs per call with each upstream client: hyper-util's pooled client (the
# default, as pcgate uses it) and hyper's own HTTP/1 connections in a pool per thread
# (CEILING_CLIENT=conn), in interleaved pairs of short runs.
#
#   bash benches/ceiling/cost.sh       # PAIRS=2 DURATION=5 by default
#
# For each run: requests a second (cache hits, then pass-through) and the ceiling's own CPU time
# per call (user and system, from /proc/<pid>/stat). Loopback only; everything started here
# stops at exit. Needs wrk and curl (benches/run.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

PAIRS=${PAIRS:-2}
DURATION=${DURATION:-5}
SANDBOX=127.0.0.1:19100
CEILING=127.0.0.1:18095

cargo build --release --quiet
(cd benches/ceiling && cargo build --release --quiet)
BIN=target/release/pcgate
CEILING_BIN=benches/ceiling/target/release/ceiling

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# wait_for, start_sandbox (sets TOKEN).
source benches/sandbox.sh
start_sandbox

# The ceiling's user and system clock ticks so far.
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

measure() { # client
  env CEILING_CLIENT="$1" "$CEILING_BIN" "$CEILING" "$SANDBOX" "Bearer $TOKEN" 2>/dev/null &
  local pid=$!
  PIDS+=("$pid")
  wait_for "http://$CEILING/v1/invoices/summary"
  local hz path rps u0 s0 u1 s1
  hz=$(getconf CLK_TCK)
  for path in /v1/invoices/summary '/v1/invoices?size=1'; do
    read -r u0 s0 < <(ticks "$pid")
    rps=$(wrk -t2 -c64 -d"${DURATION}s" "http://$CEILING$path" | awk '/Requests\/sec/ {print $2}')
    read -r u1 s1 < <(ticks "$pid")
    awk -v c="$1" -v p="$path" -v r="$rps" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v d="$DURATION" -v hz="$hz" \
      'BEGIN { printf "%-8s %-22s %9.0f calls/s  user %5.2f  system %5.2f  µs a call\n", c, p, r, du / hz / d / r * 1e6, ds / hz / d / r * 1e6 }'
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

for _ in $(seq "$PAIRS"); do
  measure default
  measure conn
done
