#!/usr/bin/env bash
# Runs the gateway on a config (default: the shipped example), after making sure RabbitMQ is
# up on 127.0.0.1:5672 (README: "Two commands"). Extra arguments go to `mqgate run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cargo
ensure_build_deps
ensure_rabbitmq
exec cargo run --release --bin mqgate -- run --config "${MQGATE_CONFIG:-config/mqgate.yaml}" "$@"
