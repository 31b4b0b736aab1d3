#!/usr/bin/env bash
# Builds the release binaries and runs mqgate against a Mosquitto the bench spawns itself
# (`mosquitto -p PORT` on a free port, never the machine's instance), in the same run:
#   1. idle connections: BENCH_CONNECTIONS (default 15000) idle MQTT connections to each server,
#      reporting resident memory per connection (VmRSS delta / N) and connections per second;
#   2. fan-in: 4 MQTT publishers -> 1 MQTT subscriber, 64-byte payloads, QoS 0 and 1,
#      msgs/s and p50/p99 latency side by side (BENCH_REPEAT runs each, default 3).
# Extra arguments go to the fan-in invocation. Needs the mosquitto package and RabbitMQ (the
# spawned mqgate connects its AMQP sink). Takes about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_rabbitmq
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto
export PATH="$PATH:/usr/sbin"

log "building release binaries"
cargo build --release --workspace --bins

bench="${CARGO_TARGET_DIR:-target}/release/mqgate-bench"
connections="${BENCH_CONNECTIONS:-15000}"
# Client and server sockets: N each; the children inherit the limit.
ulimit -n "$((connections + 4000))" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
rc=0
log "idle: $connections idle connections, mqgate vs Mosquitto"
"$bench" --mode idle --connections "$connections" || rc=$?
log "fan-in: 4 publishers -> 1 subscriber, QoS 0 and 1, mqgate vs Mosquitto"
"$bench" --mode fanin --qos both --messages 100000 --repeat "${BENCH_REPEAT:-3}" "$@" || rc=$?
exit "$rc"
