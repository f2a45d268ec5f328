#!/usr/bin/env bash
# muster, NSD and Knot DNS side by side as authoritative servers for the
# same data, loaded the same way by dnsperf.
#
#   benches/dns_vs_peers.sh [SECONDS per run, default 10] [ROUNDS, default 3]
#
# Environment (all optional):
#   MODE=udp|tcp     dnsperf transport (-m), default udp
#   SERVICES=1000    services in the zone, 3 instances each (100000 for the scale test)
#   WORKERS=1        server workers: muster dns.udp_workers, NSD server-count,
#                    Knot udp-workers and tcp-workers
#   CLIENTS=8        dnsperf -c;  THREADS=$WORKERS  dnsperf -T
#   SERVER_CPUS=0    CPUs the servers are pinned to;  CLIENT_CPUS=1  dnsperf's
#   WARMUP=1         seconds of unmeasured load per server before round 1 (0: none)
#   PICK=median      per server and column, the median of the rounds; PICK=best:
#                    the highest queries/s and the lowest lost, latency and CPU
#                    per query (other load only adds cost); memory is the median
#   MUSTER_BIN=path  use this muster binary instead of `cargo build --release`
#   KEEP=1           keep the work directory (configs, zone, logs, dnsperf output)
#   CHURN=1000       also run muster while an API client adds and removes an
#                    instance CHURN times a second (row "churn"; its CPU per
#                    query includes the registrations' cost); 0: off
#
# Data: SERVICES services svc<N>, each with instances i1..i3 at 127.x
# addresses (data only: every packet stays on 127.0.0.1) and a named port
# `http`. muster (store = "memory") gets them over its HTTP API; NSD and
# Knot get a zone file svc.internal. holding the names muster answers:
# <svc> A (3), _http._tcp.<svc> SRV (3, targets i<k>.<svc>.svc.internal.)
# and the targets' A records, TTL 5 as muster's dns.ttl; the apex SOA/NS
# are the same file muster serves. Queries: 45% <svc> A, 45%
# _http._tcp.<svc> SRV, 10% nosuch<N> A (NXDOMAIN), shuffled with a fixed
# seed, no EDNS (dnsperf's default).
#
# Layout (2 cores): the server under test on CPU 0, dnsperf (-c8 -T1) on
# CPU 1. All three servers run for the whole benchmark; runs alternate
# knot, nsd, muster, knot, ... so all see the same machine state. A
# server's CPU time is the first field of /proc/PID/task/*/schedstat (ns)
# summed over its threads and child processes (NSD forks its server and
# xfrd), read before and after each run. Memory is VmRSS summed over the
# processes, and PSS (smaps_rollup), which does not count NSD's forked
# copies of the zone more than once. The table reports the median of the
# rounds, column by column (or the best, PICK=best), and warns when a
# server waited for its CPU (other load on CPU 0) during a run.
# Installs nothing: it says what to install if a tool is missing.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

seconds=${1:-10}
rounds=${2:-3}
mode=${MODE:-udp}
services=${SERVICES:-1000}
workers=${WORKERS:-1}
clients=${CLIENTS:-8}
threads=${THREADS:-$workers}
server_cpus=${SERVER_CPUS:-0}
client_cpus=${CLIENT_CPUS:-1}
warmup=${WARMUP:-1}
pick=${PICK:-median}
churn=${CHURN:-0}
servers=(knot nsd muster)

case $mode in udp | tcp) ;; *) echo "MODE must be udp or tcp, not $mode" >&2; exit 1 ;; esac
case $pick in median | best) ;; *) echo "PICK must be median or best, not $pick" >&2; exit 1 ;; esac
case $churn in '' | *[!0-9]*) echo "CHURN is a whole number (registrations per second)" >&2; exit 1 ;; esac
for n in "$seconds" "$rounds" "$services" "$workers" "$clients" "$threads"; do
  case $n in '' | *[!0-9]* | 0) echo "SECONDS, ROUNDS, SERVICES, WORKERS, CLIENTS and THREADS are whole numbers > 0" >&2; exit 1 ;; esac
done

. "$(dirname "$0")/lib.sh"
require_tools nsd:nsd knotd:knot dnsperf:dnsperf taskset:util-linux python3:python3 pgrep:procps
require_two_cpus "servers on one, dnsperf on the other"

cd "$(dirname "$0")/.."
if [ -n "${MUSTER_BIN:-}" ]; then
  muster_bin=$MUSTER_BIN
else
  cargo build --release --quiet
  muster_bin=$PWD/target/release/muster
fi
work=$(mktemp -d)
pids=()

# PID and every process below it.
tree_pids() {
  local child
  echo "$1"
  for child in $(pgrep -P "$1" || true); do tree_pids "$child"; done
}

# TERM a process tree, KILL whatever is left after 5 s.
kill_tree() {
  local all pid deadline
  all=$(tree_pids "$1")
  # shellcheck disable=SC2086
  kill $all 2>/dev/null || true
  deadline=$((SECONDS + 5))
  for pid in $all; do
    while kill -0 "$pid" 2>/dev/null && [ "$(awk '{ print $3 }' /proc/"$pid"/stat 2>/dev/null)" != Z ] &&
      [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  done
  # shellcheck disable=SC2086
  kill -9 $all 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill_tree "$pid"; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT


# Data, queries, registration and DNS probes, in one helper.
cat >"$work/bench.py" <<'PY'
import http.client, json, os, random, socket, struct, sys, threading, time

HTTP_PORT = 8080
TYPES = {"A": 1, "NS": 2, "SOA": 6, "SRV": 33}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def address(n, k):
    """Instance k (0..2) of service n (1..): 127.1.0.4 upwards, data only."""
    return socket.inet_ntoa(struct.pack(">I", 0x7F010000 + n * 4 + k))


def zone(services, header, out):
    with open(header) as f:
        head = f.read()
    with open(out, "w") as f:
        f.write(head)
        for n in range(1, services + 1):
            s = f"svc{n}"
            for k in range(3):
                f.write(f"{s} 5 IN A {address(n, k)}\n")
            for k in range(3):
                f.write(f"i{k + 1}.{s} 5 IN A {address(n, k)}\n")
            for k in range(3):
                f.write(f"_http._tcp.{s} 5 IN SRV 0 1 {HTTP_PORT} i{k + 1}.{s}\n")


def queries(services, out):
    rng = random.Random(20261126)
    with open(out, "w") as f:
        for _ in range(max(100_000, 2 * services)):
            r = rng.random()
            n = rng.randint(1, services)
            if r < 0.45:
                f.write(f"svc{n}.svc.internal A\n")
            elif r < 0.90:
                f.write(f"_http._tcp.svc{n}.svc.internal SRV\n")
            else:
                f.write(f"nosuch{rng.randint(1, 1_000_000)}.svc.internal A\n")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def api_get(api, path):
    host, port = api.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def register(api, pid, services, connections, depth=64):
    """PUT every instance: `connections` keep-alive connections, each sending
    `depth` requests at a time (HTTP/1.1 pipelining) before reading the answers."""
    host, port = api.rsplit(":", 1)
    deadline = time.monotonic() + 30
    while True:  # the API is up
        try:
            if api_get(api, "/v1/status")[0] == 200:
                break
        except OSError:
            pass
        if not alive(pid) or time.monotonic() > deadline:
            sys.exit(f"muster API at {api} never answered")
        time.sleep(0.05)
    items = [(n, k) for n in range(1, services + 1) for k in range(3)]
    errors = []

    def request(n, k):
        body = json.dumps({"address": address(n, k), "port": HTTP_PORT, "ports": {"http": HTTP_PORT}}).encode()
        head = (f"PUT /v1/services/svc{n}/instances/i{k + 1} HTTP/1.1\r\nHost: {api}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    def response(f):
        """(status, body) of the next response on f."""
        status = int(f.readline().split()[1])
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError(f"unexpected transfer-encoding {value.strip()!r}")
        return status, f.read(length)

    def worker(part):
        try:
            with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as f:
                for i in range(0, len(part), depth):
                    batch = part[i:i + depth]
                    sock.sendall(b"".join(request(n, k) for n, k in batch))
                    for n, k in batch:
                        status, text = response(f)
                        if status != 200:
                            errors.append(f"svc{n}/i{k + 1}: {status} {text[:200]!r}")
                            return
        except (OSError, ValueError, IndexError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    start = time.monotonic()
    workers = [threading.Thread(target=worker, args=(items[t::connections],)) for t in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        sys.exit("registration failed: " + "; ".join(errors[:5]))
    deadline = time.monotonic() + 60 + services / 1000
    while True:  # the registry holds all of them
        status, body = api_get(api, "/v1/status")
        if status == 200 and json.loads(body).get("instances") == len(items):
            break
        if time.monotonic() > deadline:
            sys.exit(f"muster holds {body!r}, not {len(items)} instances")
        time.sleep(0.05)
    print(f"{time.monotonic() - start:.2f}")


def churn(api, services, rate, seconds, connections=8):
    """Adds and removes instance i4 of one service after another, `rate`
    changes a second for `seconds`, over `connections` keep-alive
    connections (each sending a batch of pipelined requests every 10 ms, so
    slow answers under load do not hold the rate down); prints the changes
    made per second."""
    counts = [0] * connections
    start = time.monotonic()
    workers = [threading.Thread(target=churn_connection,
                                args=(api, services, rate / connections, seconds, c, connections, counts))
               for c in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"{sum(counts) / (time.monotonic() - start):.0f}")


def churn_connection(api, services, rate, seconds, me, connections, counts):
    """One connection's share of `churn`: services me+1, me+1+connections, ..."""
    host, port = api.rsplit(":", 1)
    batch = max(1, round(rate / 100))
    start = time.monotonic()
    done = 0
    mine = list(range(me + 1, services + 1, connections))
    with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as f:
        while time.monotonic() - start < seconds:
            requests = []
            for _ in range(batch):
                n = mine[done // 2 % len(mine)]
                path = f"/v1/services/svc{n}/instances/i4"
                if done % 2 == 0:
                    body = json.dumps({"address": address(n, 3), "port": HTTP_PORT,
                                       "ports": {"http": HTTP_PORT}}).encode()
                    requests.append(f"PUT {path} HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n"
                                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                else:
                    requests.append(f"DELETE {path} HTTP/1.1\r\nHost: {api}\r\n\r\n".encode())
                done += 1
            sock.sendall(b"".join(requests))
            for _ in requests:
                status = int(f.readline().split()[1])
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                f.read(length)
                if status >= 300:
                    sys.exit(f"churn request failed: {status}")
            counts[me] = done
            ahead = start + done / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


def query(port, name, qtype, tcp=False, timeout=1.0):
    """One query (RD set, no EDNS, as dnsperf sends them); (rcode, an, ns, ar, bytes)."""
    qid = random.randrange(65536)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    msg = struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0" + struct.pack(">HH", TYPES[qtype], 1)
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack(">H", len(msg)) + msg)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack(">H", data[:2])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("connection closed")
                data += chunk
            resp = data[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(msg, ("127.0.0.1", port))
            while True:
                resp, _ = s.recvfrom(65536)
                if resp[:2] == msg[:2]:
                    break
    _, flags, _, an, ns, ar = struct.unpack(">6H", resp[:12])
    return RCODES.get(flags & 0xF, str(flags & 0xF)), an, ns, ar, len(resp)


def wait(port, pid, services, deadline_s):
    """Until the last service's SRV name answers 3 records (the whole zone is in)."""
    deadline = time.monotonic() + deadline_s
    name = f"_http._tcp.svc{services}.svc.internal"
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive(pid):
            sys.exit(f"server {pid} exited ({last})")
        try:
            answer = query(port, name, "SRV", timeout=0.2)
            if answer[0] == "NOERROR" and answer[1] == 3:
                return
            last = f"{answer}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    sys.exit(f"port {port}: {name} SRV never answered 3 records ({last})")


def probe(port, services):
    """One A, one SRV and one NXDOMAIN query over UDP and TCP: counts and sizes."""
    n = services
    checks = [("A", f"svc{n}.svc.internal", "A", ("NOERROR", 3, None)),
              ("SRV", f"_http._tcp.svc{n}.svc.internal", "SRV", ("NOERROR", 3, 3)),
              ("NX", "nosuch1.svc.internal", "A", ("NXDOMAIN", 0, None))]
    out, ok = [], True
    for label, name, qtype, (rcode, an, ar_min) in checks:
        udp = query(port, name, qtype)
        tcp = query(port, name, qtype, tcp=True)
        for got in (udp, tcp):
            if got[0] != rcode or got[1] != an or (ar_min is not None and got[3] < ar_min):
                ok = False
        out.append(f"{label}: {udp[0]} an={udp[1]} ns={udp[2]} ar={udp[3]} {udp[4]}B (tcp {tcp[4]}B);")
    print(" ".join(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "zone":
        zone(int(args[0]), args[1], args[2])
    elif cmd == "queries":
        queries(int(args[0]), args[1])
    elif cmd == "register":
        register(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "wait":
        wait(int(args[0]), int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "probe":
        probe(int(args[0]), int(args[1]))
    elif cmd == "churn":
        churn(args[0], int(args[1]), int(args[2]), float(args[3]))
    else:
        sys.exit(f"unknown command {cmd}")
PY
bench() { taskset -c "$client_cpus" python3 "$work/bench.py" "$@"; }

# The apex as muster serves it (its zones_dir); the peers' zone is this
# plus the registry's names.
mkdir -p "$work/zones" "$work/zone" "$work/runs"
cat >"$work/zones/svc.internal.zone" <<'EOF'
$ORIGIN svc.internal.
$TTL 3600
@        IN SOA ns.svc.internal. hostmaster.svc.internal. 1 3600 600 86400 5
@        IN NS  ns.svc.internal.
ns       IN A   127.0.0.1
EOF
bench zone "$services" "$work/zones/svc.internal.zone" "$work/zone/svc.internal.zone"
bench queries "$services" "$work/queries"
ready_deadline=$((60 + services / 500))
register_connections=8

version_knot=$(knotd -V 2>&1 | grep -o '[0-9][0-9.]*' | head -1)
version_nsd=$(nsd -v 2>&1 | grep -o '[0-9][0-9.]*' | head -1)
version_muster=$("$muster_bin" --version 2>&1 | grep -o '[0-9][0-9.]*' | head -1)

declare -A port pid_of
port[knot]=$(free_port)
port[nsd]=$(free_port)
port[muster]=$(free_port)
api_port=$(free_port)

start_knot() {
  mkdir -p "$work/knot/db"
  cat >"$work/knot/knot.conf" <<EOF
server:
    rundir: "$work/knot"
    listen: 127.0.0.1@${port[knot]}
    udp-workers: $workers
    tcp-workers: $workers
    background-workers: 1
log:
  - target: "$work/knot/log"
    any: warning
database:
    storage: "$work/knot/db"
template:
  - id: default
    storage: "$work/zone"
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: svc.internal.
    file: svc.internal.zone
EOF
  taskset -c "$server_cpus" knotd -c "$work/knot/knot.conf" 2>>"$work/knot/log" & pid_of[knot]=$!
  pids+=("${pid_of[knot]}")
}

start_nsd() {
  mkdir -p "$work/nsd"
  cat >"$work/nsd/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1@${port[nsd]}
    do-ip6: no
    server-count: $workers
    verbosity: 0
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
    username: ""
    chroot: ""
    zonesdir: "$work/nsd"
    database: ""
    zonelistfile: "$work/nsd/zone.list"
    xfrdfile: "$work/nsd/xfrd.state"
    xfrdir: "$work/nsd"
    pidfile: "$work/nsd/nsd.pid"
    logfile: "$work/nsd/log"
    cookie-secret-file: "$work/nsd/cookiesecrets.txt"
remote-control:
    control-enable: no
zone:
    name: svc.internal.
    zonefile: "$work/zone/svc.internal.zone"
EOF
  taskset -c "$server_cpus" nsd -d -c "$work/nsd/nsd.conf" 2>>"$work/nsd/log" & pid_of[nsd]=$!
  pids+=("${pid_of[nsd]}")
}

start_muster() {
  mkdir -p "$work/muster"
  cat >"$work/muster/muster.toml" <<EOF
data_dir = "$work/muster/data"
store = "memory"
zones_dir = "$work/zones"
[dns]
listen = ["127.0.0.1:${port[muster]}"]
udp_workers = $workers
[api]
listen = "127.0.0.1:$api_port"
[gateway]
enabled = false
[log]
level = "warn"
EOF
  taskset -c "$server_cpus" "$muster_bin" serve --config "$work/muster/muster.toml" 2>>"$work/muster/log" &
  pid_of[muster]=$!
  pids+=("${pid_of[muster]}")
  register_s=$(bench register "127.0.0.1:$api_port" "${pid_of[muster]}" "$services" "$register_connections") || {
    cat "$work/muster/log" >&2
    exit 1
  }
}

for server in "${servers[@]}"; do
  "start_$server"
  bench wait "${port[$server]}" "${pid_of[$server]}" "$services" "$ready_deadline" || {
    tail -n 20 "$work/$server/log" >&2
    exit 1
  }
done

# The same answers from each, as dnsperf sends the queries (no EDNS).
declare -A answers
for server in "${servers[@]}"; do
  answers[$server]=$(bench probe "${port[$server]}" "$services") || {
    echo "$server does not answer as expected: ${answers[$server]:-}" >&2
    exit 1
  }
done

# A server's CPU nanoseconds so far and its nanoseconds spent runnable but
# waiting for a CPU, all threads of all its processes. (%.0f: mawk's %d
# stops at 2^31.)
cpu_ns() {
  local p
  for p in $(tree_pids "$1"); do cat /proc/"$p"/task/*/schedstat 2>/dev/null || true; done |
    awk '{ run += $1; wait += $2 } END { printf "%.0f %.0f\n", run, wait }'
}

# VmRSS and PSS of a server, in MB, summed over its processes.
memory_mb() {
  local p rss=0 pss=0 kb
  for p in $(tree_pids "$1"); do
    kb=$(awk '/^VmRSS/ { print $2 }' /proc/"$p"/status 2>/dev/null || true)
    rss=$((rss + ${kb:-0}))
    kb=$(awk '/^Pss:/ { print $2 }' /proc/"$p"/smaps_rollup 2>/dev/null || true)
    pss=$((pss + ${kb:-0}))
  done
  awk -v r="$rss" -v p="$pss" 'BEGIN { printf "%.1f %.1f\n", r / 1024, p / 1024 }'
}

# A dnsperf run of $2 seconds against server $1, output to $3 and its CPU
# seconds (user + system) to $3.cpu.
dnsperf_run() {
  local TIMEFORMAT='%U %S' status=0
  {
    time taskset -c "$client_cpus" dnsperf -s 127.0.0.1 -p "${port[$1]}" -m "$mode" -d "$work/queries" \
      -l "$2" -c "$clients" -T "$threads" >"$3" 2>&1 || status=$?
  } 2>"$3.cpu"
  if [ "$status" -ne 0 ]; then
    echo "dnsperf against $1 failed:" >&2
    cat "$3" >&2
    exit 1
  fi
}

# "qps lost completed latency_ms response_bytes nxdomain_pct" from a dnsperf report.
parse() {
  awk '
    /Queries completed:/ { done = $3 }
    /Queries lost:/ { lost = $3 }
    /Queries per second:/ { qps = $4 }
    /Average Latency/ { lat = $4 * 1000 }
    /Average packet size:/ { resp = $NF }
    /Response codes:/ { for (i = 1; i < NF; i++) if ($i == "NXDOMAIN") nx = $(i + 1) }
    END {
      if (done == "") exit 1
      printf "%.0f %.0f %.0f %.3f %.0f %.1f\n", qps, lost, done, lat, resp, done ? 100 * nx / done : 0
    }' "$1"
}

# The churn row: the same muster, loaded the same way, while instances
# come and go through its API.
if [ "$churn" -gt 0 ]; then
  servers+=(churn)
  port[churn]=${port[muster]}
  pid_of[churn]=${pid_of[muster]}
  answers[churn]="muster, with $churn registry changes per second"
fi

if [ "$warmup" -gt 0 ]; then
  for server in "${servers[@]}"; do dnsperf_run "$server" "$warmup" "$work/runs/warmup.$server"; done
fi

results=()
churn_rates=()
for round in $(seq 1 "$rounds"); do
  for server in "${servers[@]}"; do
    pid=${pid_of[$server]}
    out=$work/runs/$round.$server
    start_ns=$(date +%s%N)
    churn_pid=
    if [ "$server" = churn ]; then
      bench churn "127.0.0.1:$api_port" "$services" "$churn" "$seconds" >"$out.churn" &
      churn_pid=$!
    fi
    read -r before before_wait < <(cpu_ns "$pid")
    dnsperf_run "$server" "$seconds" "$out"
    read -r after after_wait < <(cpu_ns "$pid")
    if [ -n "$churn_pid" ]; then
      wait "$churn_pid" || { echo "the churn client failed" >&2; exit 1; }
      churn_rates+=("$(cat "$out.churn")")
    fi
    end_ns=$(date +%s%N)
    read -r qps lost done lat resp nx < <(parse "$out") || { echo "no statistics in $out" >&2; cat "$out" >&2; exit 1; }
    read -r rss pss < <(memory_mb "$pid")
    cpu_us=$(awk -v a="$after" -v b="$before" -v n="$done" 'BEGIN { printf "%.2f", n ? (a - b) / 1000 / n : 0 }')
    wall=$((end_ns - start_ns))
    busy=$(awk -v a="$after" -v b="$before" -v t="$wall" 'BEGIN { printf "%.0f", 100 * (a - b) / t }')
    waited=$(awk -v a="$after_wait" -v b="$before_wait" -v t="$wall" 'BEGIN { printf "%.0f", 100 * (a - b) / t }')
    client=$(awk -v t="$wall" '{ printf "%.0f", 100 * ($1 + $2) * 1e9 / t }' "$out.cpu")
    results+=("$round $server $qps $lost $lat $cpu_us $busy $waited $client $rss $pss $resp $nx")
  done
done

echo "dnsperf -m $mode -c$clients -T$threads, ${seconds}s runs, $rounds interleaved rounds (knot, nsd, muster);" \
  "servers ($workers worker$([ "$workers" = 1 ] || echo s)) on CPU $server_cpus, dnsperf on CPU $client_cpus"
echo "$services services x 3 instances; queries 45% A, 45% SRV _http._tcp, 10% NXDOMAIN, no EDNS;" \
  "knot $version_knot, nsd $version_nsd, muster $version_muster;" \
  "muster took ${register_s}s to register $((services * 3)) instances over its API ($register_connections connections, 64 requests in flight on each)"
echo
echo "answers (UDP; sizes over UDP and TCP):"
for server in "${servers[@]}"; do printf '  %-7s %s\n' "$server" "${answers[$server]}"; done
echo
echo "busy%: server CPU time / wall time; wait%: server time runnable but waiting for its CPU (other"
echo "load on CPU $server_cpus); dnsperf%: dnsperf's CPU time / wall time (its threads share CPU $client_cpus; near 100"
echo "with the server well under 100 busy: the client, not the server, sets queries/s)"
row='%-6s %-7s %10s %8s %8s %12s %6s %6s %9s %8s %8s %7s %6s\n'
# shellcheck disable=SC2059
printf "$row" round server queries/s lost avg_ms cpu_us/query busy% wait% dnsperf% rss_mb pss_mb resp_B nx%
# shellcheck disable=SC2059,SC2086
for line in "${results[@]}"; do printf "$row" $line; done

# Column $2 (1-based, as in $results) over server $1's rounds: the median,
# or with PICK=best the lowest (the highest with $3 = high).
choose() {
  local how=$pick
  [ "$how" = best ] && how=${3:-low}
  printf '%s\n' "${results[@]}" | awk -v s="$1" -v c="$2" '$2 == s { print $c }' | sort -g |
    awk -v how="$how" '{ v[NR] = $1 } END {
      if (how == "low") print v[1]; else if (how == "high") print v[NR];
      else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -A med_qps med_lost med_lat med_cpu med_rss med_pss
for server in "${servers[@]}"; do
  med_qps[$server]=$(choose "$server" 3 high)
  med_lost[$server]=$(choose "$server" 4)
  med_lat[$server]=$(choose "$server" 5)
  med_cpu[$server]=$(choose "$server" 6)
  med_rss[$server]=$(choose "$server" 10 median)
  med_pss[$server]=$(choose "$server" 11 median)
done
ratio() { awk -v m="$1" -v n="$2" 'BEGIN { printf "%.2f", n ? m / n : 0 }'; }


echo
contended=$(printf '%s\n' "${results[@]}" | awk '$8 > 10' | wc -l)
if [ "$contended" -gt 0 ]; then
  echo "warning: in $contended of $((rounds * ${#servers[@]})) runs the server waited for CPU $server_cpus over 10% of" \
    "the time (wait%): other load shared the machine; the figures are not clean"
fi
if [ "$pick" = best ]; then
  echo "best of $rounds rounds, column by column (memory: median); CPU ratios are this server's CPU per query / the peer's"
else
  echo "median of $rounds rounds, column by column; CPU ratios are this server's CPU per query / the peer's"
fi
summary='%-7s %10s %8s %8s %12s %8s %8s %13s %12s\n'
# shellcheck disable=SC2059
printf "$summary" server queries/s lost avg_ms cpu_us/query rss_mb pss_mb cpu_vs_knot cpu_vs_nsd
for server in "${servers[@]}"; do
  # shellcheck disable=SC2059
  printf "$summary" "$server" "$(printf '%.0f' "${med_qps[$server]}")" "$(printf '%.0f' "${med_lost[$server]}")" \
    "$(printf '%.3f' "${med_lat[$server]}")" "$(printf '%.2f' "${med_cpu[$server]}")" "$(printf '%.1f' "${med_rss[$server]}")" "$(printf '%.1f' "${med_pss[$server]}")" \
    "$(ratio "${med_cpu[$server]}" "${med_cpu[knot]}")" "$(ratio "${med_cpu[$server]}" "${med_cpu[nsd]}")"
done
echo
echo "muster / knot: queries/s $(ratio "${med_qps[muster]}" "${med_qps[knot]}")," \
  "CPU per query $(ratio "${med_cpu[muster]}" "${med_cpu[knot]}");" \
  "muster / nsd: queries/s $(ratio "${med_qps[muster]}" "${med_qps[nsd]}")," \
  "CPU per query $(ratio "${med_cpu[muster]}" "${med_cpu[nsd]}")"
echo "round by round (servers of a round ran one after another): muster / knot CPU per query" \
  "$(paired muster knot 6); muster / nsd $(paired muster nsd 6)"
if [ "$churn" -gt 0 ]; then
  echo "churn: registry changes per second achieved: ${churn_rates[*]};" \
    "with them muster's queries/s $(ratio "${med_qps[churn]}" "${med_qps[muster]}")x," \
    "CPU per query $(ratio "${med_cpu[churn]}" "${med_cpu[muster]}")x of muster's without (medians)"
  echo "churn, round by round (the two rows of a round ran back to back, so the machine's drift" \
    "between rounds cancels): queries/s $(paired churn muster 3), CPU per query $(paired churn muster 6)"
fi
