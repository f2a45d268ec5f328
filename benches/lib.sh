# Helpers the load scripts in benches/ share; source it, do not run it.

# require_tools COMMAND:PACKAGE ...: exits saying what to apt-get install
# when a command is missing. Installs nothing.
require_tools() {
  local missing=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing tools; install them with: apt-get install ${missing[*]}" >&2
    exit 1
  fi
}

# require_two_cpus WHY: exits unless the machine has at least two CPUs.
require_two_cpus() {
  if [ "$(nproc)" -lt 2 ]; then
    echo "needs 2 CPUs ($1)" >&2
    exit 1
  fi
}

# free_port: a loopback TCP port nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for URL [TRIES, default 100]: polls URL every 0.1 s until it
# answers 2xx; exits after TRIES attempts.
wait_for() {
  local tries=${2:-100}
  for _ in $(seq 1 "$tries"); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2
  exit 1
}

# Column $3 of server $1 over that of server $2 in the same round, from
# the caller's `results` rows ("round server column3 ..."): the median of
# the rounds' ratios, then each round's in order.
paired() {
  local each
  each=$(printf '%s\n' "${results[@]}" | awk -v a="$1" -v b="$2" -v c="$3" '
    $2 == a { x[$1] = $c } $2 == b { y[$1] = $c }
    END { for (r = 1; r in x; r++) if (y[r] > 0) printf "%.2f\n", x[r] / y[r] }')
  printf '%sx (rounds: %s)' \
    "$(sort -g <<<"$each" | awk '{ v[NR] = $1 } END {
      if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
    "$(paste -sd' ' <<<"$each")"
}
