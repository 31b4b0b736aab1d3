#!/usr/bin/env bash
# The whole test suite, with everything it needs set up first (README: "Two commands").
#  - RabbitMQ on 127.0.0.1:5672 (guest/guest): started if installed and stopped, installed from
#    Debian's rabbitmq-server package if missing (needs root). The SASL EXTERNAL test starts a
#    second node of its own from that package (spare ports, a temp dir; the machine's node is
#    left alone). On RabbitMQ 3.x the rabbitmq_amqp1_0 plugin is enabled (AMQP 1.0 for
#    tests/it/amqp10.rs), nothing else changed.
#  - mosquitto-clients (mosquitto_pub/mosquitto_sub) and the mosquitto broker binary (the
#    bridge tests start their own on a spare port): installed if missing.
#  - openssl (the command line tool; tests/it/webhooks_tls.rs makes certificates with it).
#  - pyzmq for python3 (tests/it/zmq.rs: the ZeroMQ peer), installed like paho-mqtt.
#  - mqtt-sn-12 for python3 (tests/it/mqttsn.rs: a third-party MQTT-SN client), the same way.
#  - paho-mqtt 2.x for python3 (tests/it/paho.rs): pip-installed if missing, or into a venv
#    under the target dir where pip refuses (externally managed python).
#  - Debian's chromium and chromium-driver, node and npm, and playwright-core (npm ci in
#    tests/console) for the web console's end-to-end test (tests/it/console.rs).
# Then formatting, clippy and every test. An unreachable service fails the run with a message;
# nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh

ensure_cargo
ensure_build_deps
ensure_rabbitmq
ensure_amqp10
ensure_mosquitto_clients
ensure_mosquitto_broker
ensure_openssl
ensure_paho
ensure_pyzmq
ensure_mqttsn_client
ensure_chromium
ensure_console_deps

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "cargo test"
cargo test --workspace --all-targets "$@"
