#!/usr/bin/env bash
# The muster gateway and nginx side by side as keep-alive reverse proxies
# in front of the same backend, loaded the same way by wrk.
#
#   benches/gateway_vs_nginx.sh [SECONDS per run, default 10] [ROUNDS, default 3]
#
# BASELINE=/path/to/another/muster puts that build in nginx's place, for an
# A/B of two muster builds under the same load (rows "baseline", "muster").
# RESPONSE_BYTES=1048576 has the backend send bodies of that size instead
# of 230 bytes (bulk transfer).
#
# Layout (2 cores): the proxy under test on CPU 0; the backend (nginx
# answering a fixed 230-byte body) and wrk (-t1 -c64) on CPU 1. Runs
# alternate nginx, muster, nginx, muster ... so both see the same machine
# state. Access logs are on for both (to files). The proxy's CPU time is
# read from /proc/PID/task/*/schedstat before and after each run, and its
# split into user and kernel time from /proc/PID/stat (clock ticks).
# Installs nothing: it says what to install if a tool is missing.
set -euo pipefail

seconds=${1:-10}
rounds=${2:-3}
peer=nginx
if [ -n "${BASELINE:-}" ]; then
  [ -x "$BASELINE" ] || { echo "BASELINE is not an executable: $BASELINE" >&2; exit 1; }
  peer=baseline
fi
connections=64

. "$(dirname "$0")/lib.sh"
require_tools nginx:nginx wrk:wrk taskset:util-linux curl:curl python3:python3
require_two_cpus "proxy on one, backend and wrk on the other"

cd "$(dirname "$0")/.."
gateway_bench_setup

backend_port=$(free_port)
nginx_port=$(free_port)
gateway_port=$(free_port)

backend_conf "$backend_port"
nginx_conf proxy "access_log $work/proxy/access.log;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$backend_port; keepalive 64; }
  server { listen 127.0.0.1:$nginx_port; location / {
    proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header X-Forwarded-For \$remote_addr; } }"

taskset -c 1 nginx -c "$work/backend/nginx.conf" & pids+=($!)

# The proxy's CPU nanoseconds so far, all threads.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ sum += $1 } END { print sum + 0 }'; }
# The proxy's user and kernel clock ticks so far: "utime stime".
cpu_ticks() { awk '{ print $14, $15 }' /proc/"$1"/stat; }
ticks_per_second=$(getconf CLK_TCK)
# TICKS over REQUESTS, in µs per request.
ticks_per_request() { awk -v t="$1" -v hz="$ticks_per_second" -v n="$2" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }'; }

# A wrk run against $1; prints "rps p50_ms p99_ms requests".
load() {
  taskset -c 1 wrk -t1 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$1/bench" |
    awk '
      function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
      /Requests\/sec/ { rps = $2 }
      /requests in/ { requests = $1 }
      $1 == "50%" { p50 = ms($2) }
      $1 == "99%" { p99 = ms($2) }
      END { printf "%s %.3f %.3f %s\n", rps, p50, p99, requests }'
}

start_nginx() { taskset -c 0 nginx -c "$work/proxy/nginx.conf" & proxy_pid=$!; wait_for "http://127.0.0.1:$nginx_port/bench"; }

start_baseline() { start_muster "$BASELINE"; }

start_muster() { # [binary, default this tree's release build]
  local binary=${1:-$muster_bin}
  mkdir -p "$work/muster"
  gateway_toml "$work/muster/muster.toml" "127.0.0.1:0" "$gateway_port"
  taskset -c 0 "$binary" serve --config "$work/muster/muster.toml" 2>"$work/muster/log" & proxy_pid=$!
  for _ in $(seq 1 100); do grep -q "muster ready" "$work/muster/log" 2>/dev/null && break; sleep 0.1; done
  api=$(grep -o 'api=[0-9.:]*' "$work/muster/log" | head -1 | cut -d= -f2)
  curl -fs -X PUT "http://$api/v1/services/backend/instances/b-1" -H 'content-type: application/json' \
    -d "{\"address\": \"127.0.0.1\", \"port\": $backend_port}" >/dev/null
  wait_for "http://127.0.0.1:$gateway_port/bench"
}

stop_proxy() { kill "$proxy_pid"; wait "$proxy_pid" 2>/dev/null || true; }

declare -A total_rps total_cpu total_p50 total_p99 total_user total_sys
results=()
for round in $(seq 1 "$rounds"); do
  for proxy in "$peer" muster; do
    "start_$proxy"
    if [ "$proxy" = nginx ]; then port=$nginx_port; else port=$gateway_port; fi
    before=$(cpu_ns "$proxy_pid")
    read -r user_before sys_before < <(cpu_ticks "$proxy_pid")
    read -r rps p50 p99 requests < <(load "$port")
    after=$(cpu_ns "$proxy_pid")
    read -r user_after sys_after < <(cpu_ticks "$proxy_pid")
    rss=$(awk '/VmRSS/ { print $2 }' /proc/"$proxy_pid"/status)
    stop_proxy
    cpu_us=$(awk -v a="$after" -v b="$before" -v n="$requests" 'BEGIN { printf "%.2f", (a - b) / 1000 / n }')
    user_us=$(ticks_per_request $((user_after - user_before)) "$requests")
    sys_us=$(ticks_per_request $((sys_after - sys_before)) "$requests")
    results+=("$round $proxy $rps $p50 $p99 $cpu_us $rss $user_us $sys_us")
    total_rps[$proxy]=$(awk -v t="${total_rps[$proxy]:-0}" -v x="$rps" 'BEGIN { print t + x }')
    total_cpu[$proxy]=$(awk -v t="${total_cpu[$proxy]:-0}" -v x="$cpu_us" 'BEGIN { print t + x }')
    total_p50[$proxy]=$(awk -v t="${total_p50[$proxy]:-0}" -v x="$p50" 'BEGIN { print t + x }')
    total_p99[$proxy]=$(awk -v t="${total_p99[$proxy]:-0}" -v x="$p99" 'BEGIN { print t + x }')
    total_user[$proxy]=$(awk -v t="${total_user[$proxy]:-0}" -v x="$user_us" 'BEGIN { print t + x }')
    total_sys[$proxy]=$(awk -v t="${total_sys[$proxy]:-0}" -v x="$sys_us" 'BEGIN { print t + x }')
  done
done

echo "wrk -t1 -c$connections, ${seconds}s runs, $rounds interleaved rounds; proxy pinned to CPU 0, backend and wrk to CPU 1"
printf '%-6s %-8s %12s %9s %9s %14s %9s %8s %8s\n' round proxy requests/s p50_ms p99_ms cpu_us/request rss_kb user_us sys_us
for line in "${results[@]}"; do printf '%-6s %-8s %12s %9s %9s %14s %9s %8s %8s\n' $line; done
avg() { awk -v t="$1" -v n="$rounds" 'BEGIN { printf "%.3f", t / n }'; }
echo
printf '%-8s %12s %9s %9s %14s %8s %8s\n' mean requests/s p50_ms p99_ms cpu_us/request user_us sys_us
for proxy in "$peer" muster; do
  printf '%-8s %12.0f %9s %9s %14s %8s %8s\n' "$proxy" "$(avg "${total_rps[$proxy]}")" "$(avg "${total_p50[$proxy]}")" \
    "$(avg "${total_p99[$proxy]}")" "$(avg "${total_cpu[$proxy]}")" "$(avg "${total_user[$proxy]}")" \
    "$(avg "${total_sys[$proxy]}")"
done
ratio() { awk -v m="$1" -v n="$2" 'BEGIN { printf "%.2f", m / n }'; }
echo
echo "muster / $peer: requests/s $(ratio "${total_rps[muster]}" "${total_rps[$peer]}")," \
  "p99 $(ratio "${total_p99[muster]}" "${total_p99[$peer]}")," \
  "CPU per request $(ratio "${total_cpu[muster]}" "${total_cpu[$peer]}")," \
  "user $(ratio "${total_user[muster]}" "${total_user[$peer]}"), kernel $(ratio "${total_sys[muster]}" "${total_sys[$peer]}") (means)"
echo "round by round (the two runs of a round back to back): p99 $(paired muster "$peer" 5)," \
  "CPU per request $(paired muster "$peer" 6), user $(paired muster "$peer" 8), kernel $(paired muster "$peer" 9)"
