#!/usr/bin/env bash
# Instructions per DNS query, counted by callgrind: repeatable on a noisy
# machine, so it is the regression figure kept in the README.
#
#   benches/dns_instructions.sh [QUERIES, default 20000] [SERVICES, default 1000]
#
# Runs benches/dns_instructions.rs under valgrind for the UDP fast path
# (pre-encoded answers), the general path, and the fast path while the
# registry changes once every 260 queries (churn), counting only inside the
# pass that answers the query mix (45% A, 45% SRV, 10% NXDOMAIN) after a
# warm-up pass, and prints instructions per query for each.
# Installs nothing: it says what to install if a tool is missing.
set -euo pipefail

queries=${1:-20000}
services=${2:-1000}
command -v valgrind >/dev/null 2>&1 || {
  echo "missing valgrind; install it with: apt-get install valgrind" >&2
  exit 1
}
cd "$(dirname "$0")/.."
binary=$(cargo bench --bench dns_instructions --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "dns_instructions" and m.get("executable"):
        print(m["executable"])')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf '%-8s %14s %12s\n' path instructions per_query
for mode in fast general churn; do
  valgrind --tool=callgrind --callgrind-out-file="$work/$mode.out" \
    --toggle-collect='*measured*' "$binary" "$mode" "$queries" "$services" \
    >/dev/null 2>"$work/$mode.log"
  total=$(awk '/^totals:/ {print $2}' "$work/$mode.out")
  awk -v m="$mode" -v t="$total" -v q="$queries" 'BEGIN { printf "%-8s %14d %12.0f\n", m, t, t / q }'
done
