#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: repeatable on a
# noisy machine, so it is the gateway's regression figure in the README.
#
#   benches/gateway_instructions.sh [SECONDS of load, default 10]
#
# Runs the release muster under valgrind as a gateway in front of one
# nginx backend (a fixed 230-byte body), warms it up, zeroes the counters,
# sends wrk -t1 -c16 for SECONDS, and divides the instructions muster
# executed during the load (all threads) by the requests wrk completed.
# The access log is on (to a file), as in gateway_vs_nginx.sh.
# Installs nothing: it says what to install if a tool is missing.
set -euo pipefail

seconds=${1:-10}

. "$(dirname "$0")/lib.sh"
require_tools valgrind:valgrind callgrind_control:valgrind nginx:nginx wrk:wrk curl:curl python3:python3

cd "$(dirname "$0")/.."
cargo build --release --quiet
muster_bin=$PWD/target/release/muster
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

backend_port=$(free_port)
api_port=$(free_port)
gateway_port=$(free_port)
body=$(printf 'x%.0s' $(seq 1 230))

cat >"$work/backend.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log $work/backend.log warn;
pid $work/backend.pid;
events { worker_connections 1024; }
http {
  client_body_temp_path $work; proxy_temp_path $work;
  fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$backend_port; location / { default_type text/plain; return 200 '$body'; } }
}
EOF
nginx -c "$work/backend.conf" & pids+=($!)

cat >"$work/muster.toml" <<EOF
data_dir = "$work/data"
store = "memory"
zones_dir = "$PWD/zones"
[dns]
listen = ["127.0.0.1:0"]
[api]
listen = "127.0.0.1:$api_port"
[gateway]
listen = "127.0.0.1:$gateway_port"
[[gateway.routes]]
name = "bench"
service = "backend"
[log]
level = "info"
EOF
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  "$muster_bin" serve --config "$work/muster.toml" 2>"$work/muster.log" &
muster_pid=$!
pids+=("$muster_pid")

wait_for "http://127.0.0.1:$api_port/v1/status" 300
curl -fs -X PUT "http://127.0.0.1:$api_port/v1/services/backend/instances/b-1" \
  -H 'content-type: application/json' \
  -d "{\"address\": \"127.0.0.1\", \"port\": $backend_port}" >/dev/null
wait_for "http://127.0.0.1:$gateway_port/bench" 300
# Warm: connections, pools and caches as they are under load.
wrk -t1 -c16 -d2s "http://127.0.0.1:$gateway_port/bench" >/dev/null

callgrind_control -z "$muster_pid" >/dev/null 2>&1
requests=$(wrk -t1 -c16 -d"${seconds}s" "http://127.0.0.1:$gateway_port/bench" |
  awk '/requests in/ { print $1 }')
callgrind_control -d "$muster_pid" >/dev/null 2>&1
dump=$(ls "$work"/callgrind.out.* | head -1)
total=$(awk '/^totals:/ { print $2 } /^summary:/ { s = $2 } END { if (s) print s }' "$dump" | head -1)
awk -v t="$total" -v n="$requests" 'BEGIN {
  printf "%-10s %14s %12s\n", "requests", "instructions", "per_request"
  printf "%-10d %14d %12.0f\n", n, t, t / n
}'
