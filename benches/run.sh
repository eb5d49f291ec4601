#!/usr/bin/env bash
# pcgate against nginx proxy_cache, side by side on one machine, in one run.
#
#   bash benches/run.sh            # DURATION=10s CONNS=64 ROUNDS=2 by default
#
# Starts the sandbox (no added latency), pcgate, and nginx with proxy_cache + proxy_cache_lock
# and the same 5 minute TTL in front of the same sandbox, then measures with wrk, alternating
# between the two: cache-hit throughput and latency on /v1/invoices/summary, pass-through on
# /v1/invoices against calling the sandbox directly, resident memory, and how many upstream calls
# 200 concurrent identical cold calls make. Both proxies send the same static bearer token, and
# neither writes an access log, so both do the same work. Loopback only; everything stops at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
SANDBOX=127.0.0.1:19100
PCGATE=127.0.0.1:18080
ADMIN=127.0.0.1:19090
NGINX=127.0.0.1:18081

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need curl; then
  echo "installing wrk, nginx-light and curl (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light curl >/dev/null
fi
cargo build --release --quiet
BIN=target/release/pcgate

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

"$BIN" --log-format text sandbox --listen "$SANDBOX" --token-ttl 24h >/dev/null 2>&1 &
PIDS+=($!)
wait_for "http://$SANDBOX/__sandbox/faults"
TOKEN=$(curl -s "http://$SANDBOX/t/oauth2/token" -d grant_type=client_credentials \
  -d client_id=pcgate-sandbox-client -d client_secret=sandbox-client-secret \
  -d resource=https://api.partnercenter.microsoft.com | sed -E 's/.*"access_token":"([^"]+)".*/\1/')

cat > "$WORK/pcgate.toml" <<TOML
[server]
listen = "$PCGATE"
admin_listen = "$ADMIN"
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
stale_while_revalidate = "1m"
stale_if_error = "1h"
coalesce = true
retry = true
[[routes]]
name = "invoices"
match = "GET /v1/invoices"
credential = "fixed"
retry = true
TOML
RUST_LOG=warn "$BIN" --log-format text run --config "$WORK/pcgate.toml" >/dev/null 2>&1 &
PCGATE_PID=$!
PIDS+=($PCGATE_PID)
wait_for "http://$ADMIN/healthz"

mkdir -p "$WORK/cache"
# As root, nginx's workers would drop to an account that cannot write the cache in $WORK.
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user root;"
cat > "$WORK/nginx.conf" <<CONF
$NGINX_USER
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  proxy_cache_path $WORK/cache levels=1:2 keys_zone=pc:10m max_size=64m inactive=10m use_temp_path=off;
  upstream sandbox { server $SANDBOX; keepalive 64; }
  server {
    listen $NGINX;
    location /v1/invoices/summary {
      proxy_pass http://sandbox;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      proxy_cache pc;
      proxy_cache_key "\$request_method\$request_uri\$http_accept\$http_x_locale";
      proxy_cache_valid 200 5m;
      proxy_cache_lock on;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
    }
    location /v1/invoices {
      proxy_pass http://sandbox;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK"
wait_for "http://$NGINX/v1/invoices?size=1"
NGINX_PIDS=$(pgrep -f "nginx: (master|worker) process" -d ' ' || true)

rss_kib() { awk '/VmRSS/ {s+=$2} END {print s+0}' $(for p in "$@"; do echo "/proc/$p/status"; done) 2>/dev/null; }
hwm_kib() { awk '/VmHWM/ {s+=$2} END {print s+0}' $(for p in "$@"; do echo "/proc/$p/status"; done) 2>/dev/null; }

# Warm both caches.
curl -s -o /dev/null "http://$PCGATE/v1/invoices/summary"
curl -s -o /dev/null "http://$NGINX/v1/invoices/summary"
PCGATE_IDLE=$(rss_kib "$PCGATE_PID")
NGINX_IDLE=$(rss_kib $NGINX_PIDS)

# wrk --latency prints "Requests/sec: N" and a distribution with "50%" and "99%" lines.
run_wrk() { # url [header] -> "rps p50_ms p99_ms"
  local out
  if [ $# -gt 1 ]; then out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H "$2" "$1"); else out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$1"); fi
  echo "$out" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 }
    $1=="50%" { p50=ms($2) }
    $1=="99%" { p99=ms($2) }
    /Non-2xx/ { bad=$NF }
    END { printf "%.0f %.3f %.3f %s\n", rps, p50, p99, bad+0 }'
}
best() { sort -k1 -n -r | head -1; }  # the round with the highest throughput

echo "cache hit, /v1/invoices/summary: $ROUNDS rounds each, alternating (c=$CONNS, $DURATION)" >&2
: > "$WORK/pc_hit"; : > "$WORK/ng_hit"
for r in $(seq "$ROUNDS"); do
  run_wrk "http://$PCGATE/v1/invoices/summary" >> "$WORK/pc_hit"
  run_wrk "http://$NGINX/v1/invoices/summary" >> "$WORK/ng_hit"
done
PCGATE_LOAD=$(hwm_kib "$PCGATE_PID")
NGINX_LOAD=$(hwm_kib $NGINX_PIDS)

echo "pass-through, /v1/invoices?size=1 (no cache), under load and one call at a time" >&2
AUTH="Authorization: Bearer $TOKEN"
DIRECT=$(run_wrk "http://$SANDBOX/v1/invoices?size=1" "$AUTH")
PC_PASS=$(run_wrk "http://$PCGATE/v1/invoices?size=1")
NG_PASS=$(run_wrk "http://$NGINX/v1/invoices?size=1")
# Added latency is what one call pays, so measure it with one connection, not under queueing.
CONNS_SAVED=$CONNS THREADS_SAVED=$THREADS
CONNS=1 THREADS=1
DIRECT1=$(run_wrk "http://$SANDBOX/v1/invoices?size=1" "$AUTH")
PC_PASS1=$(run_wrk "http://$PCGATE/v1/invoices?size=1")
NG_PASS1=$(run_wrk "http://$NGINX/v1/invoices?size=1")
CONNS=$CONNS_SAVED THREADS=$THREADS_SAVED

echo "200 concurrent identical cold calls (upstream slowed to 200 ms so they overlap)" >&2
curl -s -o /dev/null -X POST "http://$SANDBOX/__sandbox/faults" -H 'content-type: application/json' -d '{"latency":"200ms"}'
cold() { # base -> upstream calls made
  curl -s -o /dev/null -X DELETE "http://$SANDBOX/__sandbox/requests"
  seq 200 | xargs -P 200 -I{} curl -s -o /dev/null "$1/v1/invoices/summary?cold=$2"
  curl -s "http://$SANDBOX/__sandbox/requests" | sed -E 's/.*"summary":([0-9]+).*/\1/'
}
PC_COLD=$(cold "http://$PCGATE" pcgate)
NG_COLD=$(cold "http://$NGINX" nginx)

read -r pc_rps pc_p50 pc_p99 pc_bad < <(best < "$WORK/pc_hit")
read -r ng_rps ng_p50 ng_p99 ng_bad < <(best < "$WORK/ng_hit")
read -r d_rps d_p50 d_p99 _ <<<"$DIRECT"
read -r pp_rps pp_p50 pp_p99 _ <<<"$PC_PASS"
read -r np_rps np_p50 np_p99 _ <<<"$NG_PASS"
read -r _ d1_p50 d1_p99 _ <<<"$DIRECT1"
read -r _ pp1_p50 pp1_p99 _ <<<"$PC_PASS1"
read -r _ np1_p50 np1_p99 _ <<<"$NG_PASS1"

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); wrk -t$THREADS -c$CONNS -d$DURATION, best of $ROUNDS"
printf '| %-40s | %12s | %12s |\n' "measure" "pcgate" "nginx"
printf '| %-40s | %12s | %12s |\n' "----------------------------------------" "------------" "------------"
printf '| %-40s | %12s | %12s |\n' "cache hit: requests/s" "$pc_rps" "$ng_rps"
printf '| %-40s | %12s | %12s |\n' "cache hit: p50 ms" "$pc_p50" "$ng_p50"
printf '| %-40s | %12s | %12s |\n' "cache hit: p99 ms" "$pc_p99" "$ng_p99"
printf '| %-40s | %12s | %12s |\n' "cache hit: non-2xx answers" "$pc_bad" "$ng_bad"
printf '| %-40s | %12s | %12s |\n' "pass-through: requests/s (direct $d_rps)" "$pp_rps" "$np_rps"
printf '| %-40s | %12s | %12s |\n' "pass-through: p50 ms (direct $d_p50)" "$pp_p50" "$np_p50"
printf '| %-40s | %12s | %12s |\n' "pass-through: p99 ms (direct $d_p99)" "$pp_p99" "$np_p99"
printf '| %-40s | %12s | %12s |\n' "one connection: p50 ms (direct $d1_p50)" "$pp1_p50" "$np1_p50"
printf '| %-40s | %12s | %12s |\n' "one connection: p50 added ms" "$(awk "BEGIN {printf \"%.3f\", $pp1_p50-$d1_p50}")" "$(awk "BEGIN {printf \"%.3f\", $np1_p50-$d1_p50}")"
printf '| %-40s | %12s | %12s |\n' "resident memory idle, MiB" "$(awk "BEGIN {printf \"%.1f\", $PCGATE_IDLE/1024}")" "$(awk "BEGIN {printf \"%.1f\", $NGINX_IDLE/1024}")"
printf '| %-40s | %12s | %12s |\n' "resident memory peak under load, MiB" "$(awk "BEGIN {printf \"%.1f\", $PCGATE_LOAD/1024}")" "$(awk "BEGIN {printf \"%.1f\", $NGINX_LOAD/1024}")"
printf '| %-40s | %12s | %12s |\n' "upstream calls for 200 cold identical" "$PC_COLD" "$NG_COLD"
echo
awk "BEGIN {printf \"ratios (pcgate / nginx): cache-hit throughput %.2f, cache-hit p99 %.2f, pass-through throughput %.2f\n\", $pc_rps/$ng_rps, $pc_p99/$ng_p99, $pp_rps/$np_rps}"
