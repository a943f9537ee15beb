#!/usr/bin/env bash
# Reproduces the figures of BENCHMARKS.md (as root; about 5 minutes):
#
#   bench/netns.sh [OUTDIR]
#
# In a network namespace of its own it starts the bench fixture (5000
# synthetic domains over DNS on 127.0.0.1:53 and HTTPS on :443, certificates
# from a test CA), stsmap built from the tree on its embedded defaults, and
# two floor responders (a fixed OK reply and a fixed NOTFOUND reply). It warms
# 4000 domains, then measures cached hits at 8 and 64 connections, parent
# keys and IP literals at 8 connections, each in ROUNDS rounds alternating
# floor and stsmap so that drift on a shared machine hits both alike, and
# finally 2 x 200 cold lookups against the bare round trips, 100 against
# bare round trips that ask the DNS questions stsmap asks, and 100 of a
# second stsmap with DANE off (no MX query) against the bare round trips. Raw JSON goes to
# OUTDIR (default: a temporary directory), the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/netns.sh: needs root (a network namespace, ports 53 and 443)" >&2; exit 1; }
command -v ip >/dev/null || { echo "bench/netns.sh: needs ip (iproute2)" >&2; exit 1; }
out="${1:-$(mktemp -d)}"
mkdir -p "$out"
ROUNDS="${ROUNDS:-5}"
N="${N:-40000}"
ns="stsmapbench$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/etc/netns/$ns"
}
trap cleanup EXIT

go build -o "$out/stsmap" . && go build -o "$out/bench" ./bench
mkdir -p "$out/fix" "$out/state" "/etc/netns/$ns"
echo "nameserver 127.0.0.1" > "/etc/netns/$ns/resolv.conf"
ip netns add "$ns" && ip -n "$ns" link set lo up
inns() { ip netns exec "$ns" "$@"; }

# Background servers run under ip netns exec directly (which execs them), so
# that $! is the server's own pid, whose CPU time bench reads.
ip netns exec "$ns" "$out/bench" -fixture -domains 5000 -dir "$out/fix" > "$out/fixture.log" 2>&1 & pids+=($!)
for _ in $(seq 600); do grep -q '^ready' "$out/fixture.log" && break; sleep 0.5; done
grep -q '^ready' "$out/fixture.log" || { cat "$out/fixture.log"; exit 1; }
ip netns exec "$ns" env SSL_CERT_FILE="$out/fix/ca.pem" STATE_DIRECTORY="$out/state" "$out/stsmap" 2> "$out/stsmap.log" & sm=$!; pids+=($sm)
ip netns exec "$ns" "$out/bench" -floor -addr 127.0.0.1:18461 -floor-reply "OK secure match=mx1.d000001.bench.test:.mx.bench.test servername=hostname" 2>/dev/null & fok=$!; pids+=($fok)
ip netns exec "$ns" "$out/bench" -floor -addr 127.0.0.1:18462 -floor-reply "NOTFOUND " 2>/dev/null & fnf=$!; pids+=($fnf)
for _ in $(seq 100); do grep -q 'stsmap serving' "$out/stsmap.log" && break; sleep 0.1; done

head -n 4000 "$out/fix/keys-hit.txt" > "$out/warm.txt"
sed -n 4001,4400p "$out/fix/keys-hit.txt" > "$out/cold1.txt"
sed -n 4401,4800p "$out/fix/keys-hit.txt" > "$out/cold2.txt"
sed -n 4801,5000p "$out/fix/keys-hit.txt" > "$out/cold3.txt"

echo "== warm: 4000 domains, first contact"
inns "$out/bench" -warm -addr 127.0.0.1:8461 -keys "$out/warm.txt" -c 16 -expect OK | grep -E 'replies|errors|duration'

# rounds NAME KEYS CONNS FLOORPORT FLOORPID WORD
rounds() {
  local name=$1 keys=$2 c=$3 fport=$4 fpid=$5 word=$6
  for r in $(seq "$ROUNDS"); do
    inns "$out/bench" -json -addr "127.0.0.1:$fport" -c "$c" -n "$N" -keys "$keys" -expect "$word" -pid "$fpid" > "$out/$name-floor-$r.json"
    inns "$out/bench" -json -addr 127.0.0.1:8461 -c "$c" -n "$N" -keys "$keys" -expect "$word" -pid "$sm" > "$out/$name-stsmap-$r.json"
  done
}
rounds hits-c8 "$out/warm.txt" 8 18461 "$fok" OK
rounds hits-c64 "$out/warm.txt" 64 18461 "$fok" OK
rounds parent-c8 "$out/fix/keys-parent.txt" 8 18462 "$fnf" NOTFOUND
rounds ip-c8 "$out/fix/keys-ip.txt" 8 18462 "$fnf" NOTFOUND

python3 - "$out" <<'PY'
import json, glob, statistics, sys
out = sys.argv[1]
print(f"{'run':10} {'':7} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'CPU us/req':>10}   stsmap vs floor")
for name in ["hits-c8", "hits-c64", "parent-c8", "ip-c8"]:
    res = {}
    for who in ["floor", "stsmap"]:
        rs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{name}-{who}-*.json"))]
        assert all(r["errors"] == 0 for r in rs), f"{name} {who}: errors"
        assert all(r.get("server_cpu_s") for r in rs), f"{name} {who}: no server CPU time (wrong pid?)"
        req = sum(r["requests"] for r in rs)
        res[who] = dict(rps=req / sum(r["duration_s"] for r in rs),
                        cpu=sum(r["server_cpu_s"] for r in rs) * 1e6 / req,
                        p50=statistics.median(r["latency_us"]["p50"] for r in rs),
                        p99=statistics.median(r["latency_us"]["p99"] for r in rs))
    f, s = res["floor"], res["stsmap"]
    for who, x in res.items():
        extra = ""
        if who == "stsmap":
            extra = f"   throughput {x['rps']/f['rps']*100:.0f} %, CPU {x['cpu']/f['cpu']:.2f}x, p99 {x['p99']/f['p99']:.2f}x"
        print(f"{name:10} {who:7} {x['rps']:8.0f} {x['p50']:8.0f} {x['p99']:8.0f} {x['cpu']:10.2f}{extra}")
PY

echo "== cold: first-contact lookups against the bare round trips (200 pairs each)"
for f in cold1 cold2; do
  inns "$out/bench" -cold -addr 127.0.0.1:8461 -keys "$out/$f.txt" -n 200 -dns 127.0.0.1:53 -https-port 443 -ca "$out/fix/ca.pem" | grep -E '^(stsmap|bare|ratio|errors)'
done
echo "== cold, the bare round trips asking the DNS questions stsmap asks (TXT with MX, A with AAAA; 100 pairs)"
inns "$out/bench" -cold -bare-as-stsmap -addr 127.0.0.1:8461 -keys "$out/cold3.txt" -n 100 -dns 127.0.0.1:53 -https-port 443 -ca "$out/fix/ca.pem" | grep -E '^(stsmap|bare|ratio|errors)'
echo "== cold, a second stsmap with DANE off (no MX query), warmed with 50 other domains, against the bare round trips (100 pairs)"
mkdir -p "$out/state-nodane"
printf 'listen: ["127.0.0.1:8463"]\ndane: "off"\nmetrics:\n  listen: ""\nadmin:\n  socket: "none"\ncache:\n  path: "%s"\n' \
  "$out/state-nodane/policies.db" > "$out/nodane.yaml"
ip netns exec "$ns" env SSL_CERT_FILE="$out/fix/ca.pem" "$out/stsmap" -config "$out/nodane.yaml" 2> "$out/stsmap-nodane.log" & pids+=($!)
for _ in $(seq 100); do grep -q 'stsmap serving' "$out/stsmap-nodane.log" && break; sleep 0.1; done
head -n 50 "$out/cold2.txt" > "$out/warm-nodane.txt" # its first lookups set up TLS and the store
inns "$out/bench" -warm -addr 127.0.0.1:8463 -keys "$out/warm-nodane.txt" -c 4 -expect OK | grep -E '^errors'
inns "$out/bench" -cold -addr 127.0.0.1:8463 -keys "$out/cold1.txt" -n 100 -dns 127.0.0.1:53 -https-port 443 -ca "$out/fix/ca.pem" | grep -E '^(stsmap|bare|ratio|errors)'
echo "== stsmap warnings and errors logged: $(grep -c 'level=WARN\|level=ERROR' "$out/stsmap.log" || true)"
echo "== stsmap (DANE off) warnings and errors logged: $(grep -c 'level=WARN\|level=ERROR' "$out/stsmap-nodane.log" || true)"
