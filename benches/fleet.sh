#!/usr/bin/env bash
# The fleet tier on and off: three pcgate processes in front of one sandbox, with [shared] on one
# redis-server (on) or each on its own (off), in one run.
#
#   bash benches/fleet.sh          # KEYS=200 LATENCY=50ms SAMPLES=200 by default
#
# Measures, for each mode:
#   - upstream calls: KEYS distinct summary keys, each asked of all three gateways at once
#     (3 x KEYS calls, 30 in flight), counted by the sandbox, and the Redis operations that failed
#     or took longer than shared.timeout meanwhile (each such call goes on alone, by design);
#   - the latency of a miss (a fresh key each call, one at a time, on one gateway): median and p90
#     of SAMPLES calls, sandbox latency included;
#   - the latency of a hit in the gateway's own cache (the same key SAMPLES times).
# Loopback only; everything stops at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-200}
LATENCY=${LATENCY:-50ms}
SAMPLES=${SAMPLES:-200}
SANDBOX=127.0.0.1:19200
REDIS_PORT=19379

need() { command -v "$1" >/dev/null 2>&1; }
if ! need redis-server || ! need curl; then
  echo "installing redis-server and curl (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server curl >/dev/null
fi
cargo build --release --quiet
BIN=target/release/pcgate

WORK=$(mktemp -d)
PIDS=()
GATEWAYS=()
cleanup() {
  stop_gateways
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
stop_gateways() {
  for pid in "${GATEWAYS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${GATEWAYS[@]}"; do wait "$pid" 2>/dev/null || true; done
  GATEWAYS=()
}
trap cleanup EXIT

wait_for() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 &
PIDS+=($!)
"$BIN" --log-format text sandbox --listen "$SANDBOX" --token-ttl 24h >/dev/null 2>&1 &
PIDS+=($!)
wait_for "http://$SANDBOX/__sandbox/faults"
curl -s -o /dev/null -X POST "http://$SANDBOX/__sandbox/faults" -d "{\"latency\": \"$LATENCY\"}"
TOKEN=$(curl -s "http://$SANDBOX/t/oauth2/token" -d grant_type=client_credentials \
  -d client_id=pcgate-sandbox-client -d client_secret=sandbox-client-secret \
  -d resource=https://api.partnercenter.microsoft.com | sed -E 's/.*"access_token":"([^"]+)".*/\1/')

# start_gateways on|off RUN: three gateways on ports 1828x (admin 1929x).
start_gateways() {
  local mode=$1 run=$2
  for i in 0 1 2; do
    {
      cat <<TOML
[server]
listen = "127.0.0.1:1828$i"
admin_listen = "127.0.0.1:1929$i"
[upstream]
base_url = "http://$SANDBOX"
[credentials.fixed]
grant = "static"
token = "$TOKEN"
[[routes]]
name = "summary"
match = "GET /v1/invoices/summary"
credential = "fixed"
cache_ttl = "5m"
coalesce = true
TOML
      if [ "$mode" = on ]; then
        printf '[shared]\nredis_url = "redis://127.0.0.1:%s"\nnamespace = "bench-%s"\n' "$REDIS_PORT" "$run"
      fi
    } > "$WORK/gw$i.toml"
    RUST_LOG=warn "$BIN" --log-format text run --config "$WORK/gw$i.toml" >/dev/null 2>&1 &
    GATEWAYS+=($!)
  done
  for i in 0 1 2; do wait_for "http://127.0.0.1:1929$i/healthz"; done
}

# The sum over the three gateways of a counter family's series (0 without [shared]).
family_sum() {
  for i in 0 1 2; do curl -s "http://127.0.0.1:1929$i/metrics"; done \
    | awk -v name="$1" 'index($0, name) == 1 { sum += $NF } END { print sum + 0 }'
}

upstream_calls() { curl -s "http://$SANDBOX/__sandbox/requests" | sed -E 's/.*"summary":([0-9]+).*/\1/; s/^[^0-9].*/0/'; }

# Prints "median p90" in milliseconds of SAMPLES curl timings of URL (with {n} replaced by the index).
timings() {
  local url=$1
  for n in $(seq "$SAMPLES"); do
    curl -s -o /dev/null -w '%{time_total}\n' "${url//\{n\}/$n}"
  done | sort -n | awk '{ t[NR] = $1 * 1000 } END { printf "%.2f %.2f\n", t[int(NR * 0.5)], t[int(NR * 0.9)] }'
}

echo "| tier | upstream calls for $KEYS keys x 3 gateways | Redis operations failed or past shared.timeout | miss latency median / p90 (ms) | own-cache hit median / p90 (ms) |"
echo "| --- | --- | --- | --- | --- |"
for mode in off on; do
  start_gateways "$mode" "$$-$mode"
  curl -s -o /dev/null -X DELETE "http://$SANDBOX/__sandbox/requests"
  for k in $(seq "$KEYS"); do
    for i in 0 1 2; do echo "http://127.0.0.1:1828$i/v1/invoices/summary?bench=$mode-$k"; done
  done | xargs -P 30 -n 1 curl -s -o /dev/null
  calls=$(upstream_calls)
  errors=$(family_sum pcgate_shared_errors_total)
  read -r miss_p50 miss_p90 < <(timings "http://127.0.0.1:18280/v1/invoices/summary?miss=$mode-{n}")
  curl -s -o /dev/null "http://127.0.0.1:18280/v1/invoices/summary?hit=$mode"
  read -r hit_p50 hit_p90 < <(timings "http://127.0.0.1:18280/v1/invoices/summary?hit=$mode")
  echo "| $mode | $calls | $errors | $miss_p50 / $miss_p90 | $hit_p50 / $hit_p90 |"
  stop_gateways
done
