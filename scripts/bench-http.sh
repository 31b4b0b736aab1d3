#!/usr/bin/env bash
# Builds the release binaries and runs the HTTP webhook bench of mqgate-bench (--mode http): an
# axum sink served by the bench process on a free loopback port; a direct reqwest loop with
# BENCH_HTTP_CONCURRENCY (default 8) requests in flight, one message per request (the ceiling);
# then a spawned mqgate forwarding QoS 1 MQTT messages from 4 publishers, one per request with
# the same concurrency; then batched (100 per request, NDJSON). Prints msgs/s per run and the
# ratios against the targets (mqgate >= 0.8x direct; batching >= 10x one per request).
# BENCH_REPEAT runs per mode (default 3, medians compared); extra arguments go to mqgate-bench
# (e.g. --messages 50000, --json). No RabbitMQ needed. Takes about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo

log "building release binaries"
cargo build --release --workspace --bins

bench="${CARGO_TARGET_DIR:-target}/release/mqgate-bench"
log "http: direct reqwest loop vs mqgate, one message per request and batched"
"$bench" --mode http --messages 200000 --repeat "${BENCH_REPEAT:-3}" \
  --http-concurrency "${BENCH_HTTP_CONCURRENCY:-8}" "$@"
