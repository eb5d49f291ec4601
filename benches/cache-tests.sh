#!/usr/bin/env bash
# The HTTP working group's cache test suite (github.com/http-tests/cache-tests, a copy in
# $SUITE) against pcgate as a shared cache and against nginx proxy_cache, in one run.
#
#   bash benches/cache-tests.sh     # SUITE=../shared/cache-tests (beside the repository) by default
#   WRITES=1 bash benches/cache-tests.sh   # also let POST/PUT/PATCH/DELETE /test/** through
#
# Copies the suite to a temp dir (npm ci), starts its origin on 127.0.0.1:18300, pcgate and nginx
# in front of it (config files generated into the temp dir; both hold the same 5 minute default
# TTL, as the summary route does, and send the same static bearer token), runs the suite against
# each, and prints the RAW=1 counts (each test scored on its own) and pcgate's failing required
# tests by topic. Results stay in $OUT (default ./target/cache-tests). Loopback only; every run
# is bounded by RUN_TIMEOUT; everything it started stops at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${SUITE:-$(cd .. && pwd)/shared/cache-tests}
OUT=${OUT:-target/cache-tests}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
WRITES=${WRITES:-0}
ORIGIN_PORT=18300
PCGATE=127.0.0.1:18380
ADMIN=127.0.0.1:18390
NGINX=127.0.0.1:18381
TOKEN=cache-tests-static-token

need() { command -v "$1" >/dev/null 2>&1; }
for tool in node npm curl; do need "$tool" || { echo "cache-tests.sh: $tool is needed" >&2; exit 1; }; done
if ! need nginx; then
  echo "installing nginx-light (Debian package)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
fi
[ -f "$SUITE/package.json" ] || { echo "cache-tests.sh: no suite at $SUITE (set SUITE=)" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/pcgate
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -f "$WORK/origin.pid" ] && kill "$(cat "$WORK/origin.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() {
  for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2
  exit 1
}

# A writable copy of the suite (npm ci needs one).
cp -r "$SUITE" "$WORK/ct"
(cd "$WORK/ct" && timeout 300 npm ci --no-audit --no-fund --loglevel=error >/dev/null)

(cd "$WORK/ct" && exec env npm_config_port=$ORIGIN_PORT npm_config_protocol=http \
  npm_config_pidfile="$WORK/origin.pid" node test-engine/server/server.mjs >"$WORK/origin.log" 2>&1) &
PIDS+=($!)
wait_for "http://127.0.0.1:$ORIGIN_PORT/state/none"

# pcgate: /test/** cached like the summary route, retries off (the suite scripts 5xx on purpose),
# the suite's own config and state calls through. The headers the tests vary on, and the
# suite's request-counting headers, are forwarded; they are keyed by the answer's Vary only.
cat >"$WORK/pcgate.toml" <<TOML
[server]
listen = "$PCGATE"
admin_listen = "$ADMIN"
[upstream]
base_url = "http://127.0.0.1:$ORIGIN_PORT"
forward_headers = ["Foo", "Bar", "Baz", "Abc", "Other", "Accept-Language", "Test-ID", "Test-Name", "Req-Num"]
[credentials.fixed]
grant = "static"
token = "$TOKEN"
[[routes]]
name = "test"
match = "GET /test/**"
credential = "fixed"
cache_ttl = "5m"
stale_while_revalidate = "1m"
stale_if_error = "1h"
coalesce = true
retry = false
[[routes]]
name = "config"
match = "PUT /config/*"
credential = "fixed"
coalesce = false
retry = false
[[routes]]
name = "state"
match = "GET /state/*"
credential = "fixed"
coalesce = false
retry = false
TOML
# pcgate lets a write through only when a route names it (403 otherwise), so by default the
# suite's invalidation tests cannot run; with WRITES=1 they can (M-SEARCH is no route method).
if [ "$WRITES" = 1 ]; then
  cat >>"$WORK/pcgate.toml" <<TOML
[[routes]]
name = "test_writes"
match = ["POST /test/**", "PUT /test/**", "PATCH /test/**", "DELETE /test/**"]
credential = "fixed"
coalesce = false
retry = false
TOML
fi
"$BIN" check-config --config "$WORK/pcgate.toml" >/dev/null
RUST_LOG=warn "$BIN" --log-format text run --config "$WORK/pcgate.toml" >"$WORK/pcgate.log" 2>&1 &
PIDS+=($!)
wait_for "http://$ADMIN/healthz"

# nginx proxy_cache with the same default TTL and stale rules; it honours the origin's
# Cache-Control, Expires and Vary by itself.
mkdir -p "$WORK/cache"
NGINX_USER=""
[ "$(id -u)" = 0 ] && NGINX_USER="user root;" # workers must be able to write $WORK/cache
cat >"$WORK/nginx.conf" <<CONF
$NGINX_USER
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  proxy_cache_path $WORK/cache levels=1:2 keys_zone=ct:10m max_size=64m inactive=10m use_temp_path=off;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 16; }
  server {
    listen $NGINX;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      proxy_cache ct;
      proxy_cache_valid 200 5m;
      proxy_cache_lock on;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
    }
  }
}
CONF
nginx -c "$WORK/nginx.conf" -p "$WORK"
wait_for "http://$NGINX/state/none"

run_suite() { # name base
  (cd "$WORK/ct" && npm_config_base="$2" npm_package_config_id='' \
    timeout "$RUN_TIMEOUT" node --no-warnings test-engine/cli.mjs >"$OUT/$1.json" 2>"$OUT/$1.err")
  (cd "$WORK/ct" && RAW=1 node summarize.mjs "$OUT/$1.json" >/dev/null)
}
run_suite pcgate "http://$PCGATE"
run_suite nginx "http://$NGINX"

# required tests passed / total, from summarize.mjs's TSV (suite, id, kind, result, detail, name)
count() { awk -F'\t' '$3 == "required" { n++; if ($4 == "pass") p++; if ($4 == "untested") u++ }
  END { printf "%d / %d (%d browser-only, not run against a shared cache)\n", p, n, u }' "$OUT/$1.tsv"; }
echo "cache-tests (RAW=1, WRITES=$WRITES), required tests passed / total:"
echo "  pcgate: $(count pcgate)"
echo "  nginx:  $(count nginx)"
echo
echo "pcgate's failing required tests, by topic (details in $OUT/pcgate.tsv):"
awk -F'\t' '$3 == "required" && $4 != "pass" { printf "  %-18s %-44s %-11s %s\n", $1, $2, $4, $5 }' "$OUT/pcgate.tsv"
