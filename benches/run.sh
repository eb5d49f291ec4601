#!/usr/bin/env bash
# pcgate against its peers, side by side on one machine, in one run (issue 17's targets).
#
#   bash benches/run.sh            # DURATION=8s CONNS=64 THREADS=2 ROUNDS=3 by default
#
# Starts the sandbox (no added latency) and, in front of it: pcgate (every default feature on:
# tracking ids, metrics, the access log at info as JSON into a file, retry and credential
# layers; no [shared] tier), nginx (`proxy_cache` + `proxy_cache_lock`, and a plain
# `proxy_pass` location), HAProxy (its `cache`, and a plain frontend) and, when cmake is
# present, a minimal Pingora pass-through proxy built from benches/pingora. Every proxy sets the
# same `Authorization: Bearer` header, keeps upstream connections alive, and caches 200s for 5
# minutes where it caches; the peers write no access log. Beside them, for reference and not as
# a peer, "hyper alone" (benches/ceiling): the same runtime shape as pcgate with nothing
# else on the path, a kept answer for hits and a bare proxy for pass-through, so the table shows
# how much of the machine hyper itself leaves to pcgate's layers.
#
# Each round measures every target once, one after the other: cache hits on
# /v1/invoices/summary, pass-through on /v1/invoices?size=1 (and the sandbox called directly),
# and the same pass-through over one connection (added latency: p50 minus the sandbox's own).
# Ratios are pcgate's figure over the peer's in the same round; the table shows the median
# round and the spread (min-max) over ROUNDS. Then pcgate's resident memory idle and at peak,
# and how many upstream calls 200 identical cold calls make. Last, each target of issue 17 is
# printed as pass or fail. Loopback only; everything started here stops at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-8s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
SANDBOX=127.0.0.1:19100
PCGATE=127.0.0.1:18080
ADMIN=127.0.0.1:19090
NGINX=127.0.0.1:18081
HAPROXY_CACHE=127.0.0.1:18082
HAPROXY=127.0.0.1:18083
PINGORA=127.0.0.1:18084
CEILING=127.0.0.1:18085
# pcgate's default cache.max_bytes: memory under load may grow by twice this plus a few MiB.
CACHE_MAX_MIB=64

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need haproxy || ! need curl; then
  echo "installing wrk, nginx-light, haproxy and curl (Debian packages)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light haproxy curl >/dev/null
fi
cargo build --release --quiet
BIN=target/release/pcgate
# Its own project, so pcgate's binary keeps its own features (see its Cargo.toml).
(cd benches/ceiling && cargo build --release --quiet)
CEILING_BIN=benches/ceiling/target/release/ceiling
PINGORA_BIN=""
if need cmake; then
  echo "building the Pingora peer (benches/pingora; the first build takes several minutes)" >&2
  (cd benches/pingora && cargo build --release --quiet)
  PINGORA_BIN=benches/pingora/target/release/pingora-bench-proxy
else
  echo "cmake not found: the Pingora peer is skipped" >&2
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Pingora drains for minutes on SIGTERM: what is still there after 2 s is killed.
  for _ in $(seq 20); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/haproxy.pid" ] && kill "$(cat "$WORK/haproxy.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for, start_sandbox (sets TOKEN).
source benches/sandbox.sh
start_sandbox

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
# The default log level (info): one JSON access-log line per call, into a file as a sidecar's
# stderr would go to its log collector.
env -u RUST_LOG "$BIN" --log-format json run --config "$WORK/pcgate.toml" >/dev/null 2>"$WORK/pcgate.log" &
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

# HAProxy's cache stores only answers with an explicit lifetime (the sandbox sends none), so the
# backend gives 200s the same 5 minutes the others use; like nginx's proxy_cache it has no Vary
# handling configured and keys on the URI.
cat > "$WORK/haproxy.cfg" <<CONF
global
  maxconn 4096
  nbthread $(nproc)
  pidfile $WORK/haproxy.pid
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
  http-reuse always
cache pc
  total-max-size 64
  max-object-size 2097152
  max-age 300
frontend cached
  bind $HAPROXY_CACHE
  http-request cache-use pc
  http-response cache-store pc
  default_backend sandbox
frontend plain
  bind $HAPROXY
  default_backend sandbox
backend sandbox
  http-request set-header Authorization "Bearer $TOKEN"
  http-response set-header Cache-Control "max-age=300" if !{ res.hdr(cache-control) -m found }
  server sandbox $SANDBOX
CONF
haproxy -f "$WORK/haproxy.cfg" -D
wait_for "http://$HAPROXY/v1/invoices?size=1"

if [ -n "$PINGORA_BIN" ]; then
  "$PINGORA_BIN" "$SANDBOX" "$PINGORA" "$TOKEN" "$(nproc)" >"$WORK/pingora.log" 2>&1 &
  PIDS+=($!)
  wait_for "http://$PINGORA/v1/invoices?size=1"
fi

# Always the default client (hyper-util's, as pcgate uses), whatever the shell exports.
env -u CEILING_CLIENT "$CEILING_BIN" "$CEILING" "$SANDBOX" "Bearer $TOKEN" >"$WORK/ceiling.log" 2>&1 &
PIDS+=($!)
wait_for "http://$CEILING/v1/invoices?size=1"
head -1 "$WORK/ceiling.log" >&2

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

# Warm the caches.
for base in "$PCGATE" "$NGINX" "$HAPROXY_CACHE" "$CEILING"; do
  curl -s -o /dev/null "http://$base/v1/invoices/summary"
  curl -s -o /dev/null "http://$base/v1/invoices/summary"
done
sleep 1
PCGATE_IDLE=$(rss_kib "$PCGATE_PID")

# wrk --latency prints "Requests/sec: N" and a distribution with "50%" and "99%" lines.
run_wrk() { # threads conns url [header] -> "rps p50_ms p99_ms non2xx"
  local t=$1 c=$2 url=$3 out
  if [ $# -gt 3 ]; then out=$(wrk -t"$t" -c"$c" -d"$DURATION" --latency -H "$4" "$url"); else out=$(wrk -t"$t" -c"$c" -d"$DURATION" --latency "$url"); fi
  echo "$out" | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 }
    $1=="50%" { p50=ms($2) }
    $1=="99%" { p99=ms($2) }
    /Non-2xx/ { bad=$NF }
    END { printf "%.0f %.3f %.3f %s\n", rps, p50, p99, bad+0 }'
}

AUTH="Authorization: Bearer $TOKEN"
HIT=/v1/invoices/summary
PASS="/v1/invoices?size=1"
# One line per measurement: round, measure, target, rps, p50, p99, non-2xx.
RESULTS="$WORK/results"
: > "$RESULTS"
measure() { # round measure target threads conns url [header]
  local round=$1 what=$2 who=$3
  shift 3
  echo "$round $what $who $(run_wrk "$@")" >> "$RESULTS"
}
PASS_PEERS="nginx haproxy"
[ -n "$PINGORA_BIN" ] && PASS_PEERS="$PASS_PEERS pingora"
pass_url() { case $1 in pcgate) echo "http://$PCGATE$PASS" ;; nginx) echo "http://$NGINX$PASS" ;; haproxy) echo "http://$HAPROXY$PASS" ;; pingora) echo "http://$PINGORA$PASS" ;; ceiling) echo "http://$CEILING$PASS" ;; esac; }

for r in $(seq "$ROUNDS"); do
  echo "round $r of $ROUNDS: cache hits, pass-through, one connection (wrk -t$THREADS -c$CONNS -d$DURATION)" >&2
  measure "$r" hit pcgate "$THREADS" "$CONNS" "http://$PCGATE$HIT"
  measure "$r" hit nginx "$THREADS" "$CONNS" "http://$NGINX$HIT"
  measure "$r" hit haproxy "$THREADS" "$CONNS" "http://$HAPROXY_CACHE$HIT"
  measure "$r" hit ceiling "$THREADS" "$CONNS" "http://$CEILING$HIT"
  measure "$r" pass direct "$THREADS" "$CONNS" "http://$SANDBOX$PASS" "$AUTH"
  for who in pcgate $PASS_PEERS ceiling; do measure "$r" pass "$who" "$THREADS" "$CONNS" "$(pass_url "$who")"; done
  # Added latency is what one call pays, so it is measured with one connection, not under queueing.
  measure "$r" one direct 1 1 "http://$SANDBOX$PASS" "$AUTH"
  for who in pcgate $PASS_PEERS; do measure "$r" one "$who" 1 1 "$(pass_url "$who")"; done
done
PCGATE_PEAK=$(hwm_kib "$PCGATE_PID")

echo "200 concurrent identical cold calls (upstream slowed to 200 ms so they overlap)" >&2
curl -s -o /dev/null -X POST "http://$SANDBOX/__sandbox/faults" -H 'content-type: application/json' -d '{"latency":"200ms"}'
cold() { # base -> upstream calls made
  curl -s -o /dev/null -X DELETE "http://$SANDBOX/__sandbox/requests"
  seq 200 | xargs -P 200 -I{} curl -s -o /dev/null "$1/v1/invoices/summary?cold=$2"
  curl -s "http://$SANDBOX/__sandbox/requests" | sed -E 's/.*"summary":([0-9]+).*/\1/'
}
PC_COLD=$(cold "http://$PCGATE" pcgate)
NG_COLD=$(cold "http://$NGINX" nginx)
HA_COLD=$(cold "http://$HAPROXY_CACHE" haproxy)

# Statistics over rounds. col: 4 rps, 5 p50, 6 p99, 7 non-2xx.
values() { awk -v m="$1" -v w="$2" -v c="$3" '$2==m && $3==w {print $c}' "$RESULTS"; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "n/a"; else if (NR%2) printf "%.6g\n", v[(NR+1)/2]; else printf "%.6g\n", (v[NR/2]+v[NR/2+1])/2}'; }
spread() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "n/a"; else printf "%.6g-%.6g\n", v[1], v[NR]}'; }
# Per-round ratio pcgate/peer of column c, or (with "added") of p50 minus the sandbox's.
ratios_of() { # measure who peer col
  awk -v m="$1" -v w="$2" -v p="$3" -v c="$4" '$2==m && $3==w {a[$1]=$c} $2==m && $3==p {b[$1]=$c}
    END {for (r in a) if (r in b && b[r] > 0) printf "%.2f\n", a[r]/b[r]}' "$RESULTS"
}
ratios() { ratios_of "$1" pcgate "$2" "$3"; } # measure peer col
added() { # target -> per-round p50 added over the sandbox, ms
  awk -v w="$1" '$2=="one" && $3=="direct" {d[$1]=$5} $2=="one" && $3==w {a[$1]=$5}
    END {for (r in a) if (r in d) printf "%.3f\n", a[r]-d[r]}' "$RESULTS"
}
added_gap() { # peer -> per-round (pcgate added - peer added), ms
  awk -v p="$1" '$2=="one" && $3=="direct" {d[$1]=$5} $2=="one" && $3=="pcgate" {a[$1]=$5} $2=="one" && $3==p {b[$1]=$5}
    END {for (r in a) if ((r in b) && (r in d)) printf "%.3f\n", (a[r]-d[r])-(b[r]-d[r])}' "$RESULTS"
}
cell() { echo "$(values "$1" "$2" "$3" | median) ($(values "$1" "$2" "$3" | spread))"; }
mib() { awk "BEGIN {printf \"%.1f\", $1/1024}"; }

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); wrk -t$THREADS -c$CONNS -d$DURATION; $ROUNDS rounds: median (min-max)"
echo "peers: $(nginx -v 2>&1 | sed 's/.*: //'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}')$([ -n "$PINGORA_BIN" ] && echo ", Pingora 0.9.1")"
printf '| %-34s | %-22s | %-22s | %-22s | %-22s | %-22s | %-22s |\n' measure pcgate nginx haproxy pingora "sandbox direct" "hyper alone"
printf '| %-34s | %-22s | %-22s | %-22s | %-22s | %-22s | %-22s |\n' "---" "---" "---" "---" "---" "---" "---"
row() { # label measure col
  local pg="n/a"; [ -n "$PINGORA_BIN" ] && [ "$2" != hit ] && pg=$(cell "$2" pingora "$3")
  local dir="n/a"; [ "$2" != hit ] && dir=$(cell "$2" direct "$3")
  local ceil="n/a"; [ "$2" != one ] && ceil=$(cell "$2" ceiling "$3")
  printf '| %-34s | %-22s | %-22s | %-22s | %-22s | %-22s | %-22s |\n' "$1" "$(cell "$2" pcgate "$3")" "$(cell "$2" nginx "$3")" "$(cell "$2" haproxy "$3")" "$pg" "$dir" "$ceil"
}
row "cache hit: requests/s" hit 4
row "cache hit: p50 ms" hit 5
row "cache hit: p99 ms" hit 6
row "cache hit: non-2xx answers" hit 7
row "pass-through: requests/s" pass 4
row "pass-through: p50 ms" pass 5
row "pass-through: p99 ms" pass 6
row "pass-through: non-2xx answers" pass 7
row "one connection: p50 ms" one 5
added_row() {
  local pg="n/a"; [ -n "$PINGORA_BIN" ] && pg="$(added pingora | median) ($(added pingora | spread))"
  printf '| %-34s | %-22s | %-22s | %-22s | %-22s | %-22s | %-22s |\n' "one connection: p50 added ms" \
    "$(added pcgate | median) ($(added pcgate | spread))" "$(added nginx | median) ($(added nginx | spread))" \
    "$(added haproxy | median) ($(added haproxy | spread))" "$pg" "0" "n/a"
}
added_row
printf '| %-34s | %-22s | %-22s | %-22s | %-22s | %-22s | %-22s |\n' "upstream calls, 200 cold identical" "$PC_COLD" "$NG_COLD" "$HA_COLD" "n/a" "n/a" "n/a"
echo "pcgate resident memory: idle $(mib "$PCGATE_IDLE") MiB, peak under load $(mib "$PCGATE_PEAK") MiB"
echo
echo "ratios, pcgate / peer, per round: median (min-max)"
ratio_line() { # label measure peer col
  printf '  %-44s %s (%s)\n' "$1" "$(ratios "$2" "$3" "$4" | median)" "$(ratios "$2" "$3" "$4" | spread)"
}
reference_line() { # label measure who peer col
  printf '  %-44s %s (%s)\n' "$1" "$(ratios_of "$2" "$3" "$4" "$5" | median)" "$(ratios_of "$2" "$3" "$4" "$5" | spread)"
}
ratio_line "cache-hit throughput / nginx proxy_cache" hit nginx 4
ratio_line "cache-hit throughput / HAProxy cache" hit haproxy 4
ratio_line "cache-hit p99 / nginx proxy_cache" hit nginx 6
ratio_line "pass-through throughput / nginx" pass nginx 4
ratio_line "pass-through throughput / HAProxy" pass haproxy 4
[ -n "$PINGORA_BIN" ] && ratio_line "pass-through throughput / Pingora" pass pingora 4
ratio_line "cache-hit throughput / hyper alone" hit ceiling 4
ratio_line "pass-through throughput / hyper alone" pass ceiling 4
reference_line "for reference: HAProxy cache / hyper alone" hit haproxy ceiling 4
reference_line "for reference: nginx pass-through / hyper alone" pass nginx ceiling 4
printf '  %-44s %s (%s)\n' "one connection: added ms, pcgate - nginx" "$(added_gap nginx | median)" "$(added_gap nginx | spread)"

# Issue 17's targets, judged on the median round.
echo
echo "targets (issue 17), on the median round:"
verdict() { if awk "BEGIN {exit !($2)}"; then echo "  pass  $1"; else echo "  FAIL  $1"; fi; }
hit_vs_haproxy=$(ratios hit haproxy 4 | median)
hit_p99_vs_nginx=$(ratios hit nginx 6 | median)
pass_vs_nginx=$(ratios pass nginx 4 | median)
gap=$(added_gap nginx | median)
idle_mib=$(mib "$PCGATE_IDLE")
growth_mib=$(awk "BEGIN {printf \"%.1f\", ($PCGATE_PEAK-$PCGATE_IDLE)/1024}")
verdict "cache-hit throughput at least HAProxy's cache: ratio $hit_vs_haproxy" "$hit_vs_haproxy >= 1"
verdict "cache-hit p99 lower than nginx's: ratio $hit_p99_vs_nginx" "$hit_p99_vs_nginx < 1"
verdict "pass-through throughput at least nginx's: ratio $pass_vs_nginx" "$pass_vs_nginx >= 1"
verdict "one-connection added latency within 0.03 ms of nginx's: pcgate - nginx = $gap ms" "$gap <= 0.03"
verdict "idle resident memory under 12 MiB: $idle_mib MiB" "$idle_mib < 12"
verdict "growth under load within 2 x cache.max_bytes + 4 MiB: $growth_mib MiB" "$growth_mib <= 2 * $CACHE_MAX_MIB + 4"
verdict "200 cold identical calls make 1 upstream call: $PC_COLD" "$PC_COLD == 1"
