#!/usr/bin/env bash
# Before/after in one run: the same mqgate-bench scenario through two mqgate binaries, in
# alternating rounds (the order flips each round, so drift on a noisy machine hits both), then
# the median throughput of each per mode and QoS and the ratio after/before.
#
#   scripts/bench-compare.sh BEFORE_MQGATE AFTER_MQGATE [ROUNDS] -- MQGATE_BENCH_ARGS...
#
# e.g. (a build of the previous commit in another worktree):
#   scripts/bench-compare.sh ../old/target/release/mqgate target/release/mqgate 5 -- \
#       --mode gateway --qos both --messages 100000
#   scripts/bench-compare.sh ../old/target/release/mqgate target/release/mqgate 5 -- \
#       --mode http --messages 50000
#   scripts/bench-compare.sh ../old/target/release/mqgate target/release/mqgate 7 -- \
#       --mode cluster --qos 1 --messages 100000 --no-broker-plugin
# Each round runs mqgate-bench once per binary with `--repeat 1 --json`; the figures are the
# rates mqgate-bench reports (`rate`, delivered msgs/s).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,15p "$0"; exit 2; }
before=$1 after=$2; shift 2
rounds=5
if [ "$1" != "--" ]; then rounds=$1; shift; fi
[ "${1:-}" = "--" ] && shift
bench=target/release/mqgate-bench
[ -x "$bench" ] || cargo build --release -p mqgate-bench
out=$(mktemp -d)
for ((r = 1; r <= rounds; r++)); do
  if ((r % 2)); then order="before after"; else order="after before"; fi
  for which in $order; do
    bin=$before; [ "$which" = after ] && bin=$after
    echo "round $r: $which ($bin)" >&2
    "$bench" --mqgate "$bin" --repeat 1 --json "$@" > "$out/$which.$r.json" || true
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def reports(v):
    if isinstance(v, dict):
        if "mode" in v and "rate" in v:
            yield v
        # --mode cluster: one summary per QoS with a rate per side.
        for r in v.get("cluster", []) if isinstance(v.get("cluster"), list) else []:
            for side in ("cross_node", "same_node", "single"):
                if r.get(side):
                    yield {"mode": "cluster-" + side.replace("_", "-"), "qos": r.get("qos", ""), "rate": r[side]}
        for x in v.values():
            yield from reports(x)
    elif isinstance(v, list):
        for x in v:
            yield from reports(x)
rates = {}
cpu = {}  # mqgate's CPU time per message, where the mode reports it
for which in ("before", "after"):
    for r in range(1, rounds + 1):
        path = os.path.join(out, f"{which}.{r}.json")
        try:
            text = open(path).read()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            for rep in reports(doc):
                if rep.get("error") or not rep.get("rate"):
                    continue
                key = (rep["mode"], rep.get("qos", ""))
                rates.setdefault(key, {}).setdefault(which, []).append(rep["rate"])
                if rep.get("mqgate_cpu_us_per_msg") is not None:
                    cpu.setdefault(key, {}).setdefault(which, []).append(rep["mqgate_cpu_us_per_msg"])
print(f"{'mode':<16} {'qos':>3} {'before msgs/s':>14} {'after msgs/s':>13} {'after/before':>12}  runs")
for (mode, qos), v in sorted(rates.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
    b, a = v.get("before", []), v.get("after", [])
    if not b or not a:
        continue
    mb, ma = statistics.median(b), statistics.median(a)
    print(f"{mode:<16} {qos!s:>3} {mb:>14.0f} {ma:>13.0f} {ma / mb:>12.3f}  {len(b)}+{len(a)}")
    c = cpu.get((mode, qos), {})
    if c.get("before") and c.get("after"):
        cb, ca = statistics.median(c["before"]), statistics.median(c["after"])
        print(f"{'':<16} {'':>3} mqgate CPU us/msg (median): before {cb:.3f}, after {ca:.3f}, after/before {ca / cb:.3f}")
PY
rm -rf "$out"
