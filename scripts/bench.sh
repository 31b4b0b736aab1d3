#!/usr/bin/env bash
# Builds the release binaries and runs the standard benchmark set of mqgate-bench: throughput at
# QoS 0 and 1, then latency at a fixed 2,000 msgs/s, each straight into RabbitMQ over AMQP (the
# ceiling) and through a spawned mqgate, in the same run. Extra arguments go to every
# mqgate-bench invocation and override the defaults here (e.g. --messages 20000, --json,
# --mode all to add Mosquitto as a plain-broker baseline). BENCH_REPEAT sets the runs per mode
# and QoS, compared by their medians (default 3); BENCH_LATENCY_MESSAGES the message count of the
# fixed-rate runs (default 20000, i.e. 10 s per run). Then `--mode templates` compares a plain
# rule with a templated one (routing_key template + when: condition) through the same mqgate.
# Last, the downlink (AMQP -> MQTT): a queue of BENCH_DOWNLINK_MESSAGES (default 100000) drained
# by a plain AMQP consumer and by mqgate's source to one MQTT QoS 1 subscriber. The whole set
# takes about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_rabbitmq

log "building release binaries"
cargo build --release --workspace --bins

bench=target/release/mqgate-bench
rc=0
log "throughput: QoS 0 and 1, direct AMQP vs through mqgate"
"$bench" --qos both --mode both --rate 0 --repeat "${BENCH_REPEAT:-3}" "$@" || rc=$?
log "latency: fixed 2000 msgs/s, QoS 0 and 1, direct AMQP vs through mqgate"
"$bench" --qos both --mode both --rate 2000 --repeat "${BENCH_REPEAT:-3}" \
  --messages "${BENCH_LATENCY_MESSAGES:-20000}" "$@" || rc=$?
log "templates: a plain rule vs a routing_key template + when: condition, through mqgate"
"$bench" --mode templates --qos both --rate 0 --repeat "${BENCH_REPEAT:-3}" "$@" || rc=$?
log "downlink: AMQP queue -> plain AMQP consumer vs mqgate source -> 1 MQTT QoS 1 subscriber"
"$bench" --mode downlink --messages "${BENCH_DOWNLINK_MESSAGES:-100000}" \
  --repeat "${BENCH_REPEAT:-3}" || rc=$?
exit "$rc"
