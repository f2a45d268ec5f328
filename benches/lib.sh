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

# gateway_bench_setup: from the repository root, builds muster in release
# mode ($muster_bin) and makes a fresh $work directory and $pids list; on
# exit every process in $pids is killed and $work removed.
gateway_bench_setup() {
  cargo build --release --quiet
  muster_bin=$PWD/target/release/muster
  work=$(mktemp -d)
  pids=()
  trap gateway_bench_cleanup EXIT
}

gateway_bench_cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# nginx_conf NAME HTTP_BLOCK: $work/NAME/nginx.conf, one nginx worker in
# the foreground with HTTP_BLOCK inside `http { }`.
nginx_conf() {
  mkdir -p "$work/$1"
  cat >"$work/$1/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
error_log $work/$1/error.log warn;
pid $work/$1/nginx.pid;
events { worker_connections 4096; }
http {
  client_body_temp_path $work/$1; proxy_temp_path $work/$1;
  fastcgi_temp_path $work/$1; uwsgi_temp_path $work/$1; scgi_temp_path $work/$1;
  $2
}
CONF
}

# backend_conf PORT: $work/backend/nginx.conf, the backend the gateway
# benches proxy to: every request answered with the same 230-byte body, or
# with a file of RESPONSE_BYTES bytes when that is set (bulk bodies).
backend_conf() {
  local body answer
  if [ -n "${RESPONSE_BYTES:-}" ]; then
    mkdir -p "$work/files"
    head -c "$RESPONSE_BYTES" /dev/zero >"$work/files/bench"
    answer="root $work/files; default_type application/octet-stream;"
  else
    body=$(printf 'x%.0s' $(seq 1 230))
    answer="default_type text/plain; return 200 '$body';"
  fi
  nginx_conf backend "access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$1; location / { $answer } }"
}

# gateway_toml FILE API_LISTEN GATEWAY_PORT: a muster config
# (memory store, access log on) whose one route "bench" sends everything
# to the service "backend".
gateway_toml() {
  cat >"$1" <<CONF
data_dir = "$(dirname "$1")/data"
store = "memory"
zones_dir = "$PWD/zones"
[dns]
listen = ["127.0.0.1:0"]
[api]
listen = "$2"
[gateway]
listen = "127.0.0.1:$3"
[[gateway.routes]]
name = "bench"
service = "backend"
[log]
level = "info"
CONF
}
