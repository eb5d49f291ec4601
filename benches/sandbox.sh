# Sourced by the benchmark scripts: the sandbox they all put behind the proxy measured.
# Needs BIN (pcgate's binary), SANDBOX (host:port) and a PIDS array the caller's cleanup kills.

# Waits up to 10 s for `$1` to answer; exits the script if it never does.
wait_for() {
  for _ in $(seq 100); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  exit 1
}

# Starts the sandbox (no added latency, day-long tokens) and sets TOKEN to one of its app tokens,
# which every proxy sends upstream.
start_sandbox() {
  "$BIN" --log-format text sandbox --listen "$SANDBOX" --token-ttl 24h >/dev/null 2>&1 &
  PIDS+=($!)
  wait_for "http://$SANDBOX/__sandbox/faults"
  TOKEN=$(curl -s "http://$SANDBOX/t/oauth2/token" -d grant_type=client_credentials \
    -d client_id=pcgate-sandbox-client -d client_secret=sandbox-client-secret \
    -d resource=https://api.partnercenter.microsoft.com | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
}
