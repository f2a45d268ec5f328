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
gateway_bench_setup

backend_port=$(free_port)
api_port=$(free_port)
gateway_port=$(free_port)

backend_conf "$backend_port"
nginx -c "$work/backend/nginx.conf" & pids+=($!)

gateway_toml "$work/muster.toml" "127.0.0.1:$api_port" "$gateway_port"
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
