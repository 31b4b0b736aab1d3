# Shared by scripts/run.sh and scripts/test.sh: make sure the services mqgate talks to are there.
# shellcheck shell=bash

log() { printf '==> %s\n' "$*"; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  [ "$(id -u)" -eq 0 ] || die "$* missing and not running as root: install it with 'sudo apt-get install -y $*'"
  if [ -z "${APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

ensure_rabbitmq() {
  # Debian's package, also when something else already serves 5672: tests/it/amqp_external.rs
  # starts a second node of its own from /usr/lib/rabbitmq/bin, with the
  # rabbitmq_auth_mechanism_ssl plugin (shipped in the same package) enabled on that node only.
  if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    log "installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  if port_open 5672; then log "RabbitMQ is listening on 127.0.0.1:5672"; return; fi
  log "starting RabbitMQ"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl start rabbitmq-server || true
  fi
  if ! port_open 5672; then
    # No systemd (containers): start it detached with a generous file limit.
    (ulimit -n 65536 2>/dev/null || true; /usr/sbin/rabbitmq-server -detached) || true
  fi
  for _ in $(seq 1 90); do
    port_open 5672 && { log "RabbitMQ is up"; return; }
    sleep 1
  done
  die "RabbitMQ did not come up on 127.0.0.1:5672 within 90 s (see /var/log/rabbitmq/)"
}

# RabbitMQ's AMQP 1.0 support for tests/it/amqp10.rs: native on 5672 in 4.x; 3.x needs its
# rabbitmq_amqp1_0 plugin (shipped in the Debian package), which this enables, and nothing else.
ensure_amqp10() {
  command -v rabbitmq-plugins >/dev/null || [ -x /usr/sbin/rabbitmq-plugins ] || export PATH="$PATH:/usr/sbin"
  local version
  version="$(rabbitmqctl version 2>/dev/null || true)"
  case "$version" in
    [4-9].*) log "RabbitMQ $version speaks AMQP 1.0 natively"; return ;;
  esac
  # Only a plugin line counts ("[E*] rabbitmq_amqp1_0 ..."): the listing's header names the
  # pattern too.
  if rabbitmq-plugins list -e rabbitmq_amqp1_0 2>/dev/null | grep -Eq '^ *\[[Ee].*\] +rabbitmq_amqp1_0 '; then
    log "RabbitMQ's rabbitmq_amqp1_0 plugin is enabled"
    return
  fi
  log "enabling RabbitMQ's rabbitmq_amqp1_0 plugin (AMQP 1.0 on 5672)"
  rabbitmq-plugins enable rabbitmq_amqp1_0 >/dev/null \
    || die "could not enable rabbitmq_amqp1_0 (tests/it/amqp10.rs needs AMQP 1.0 on 127.0.0.1:5672)"
}

ensure_mosquitto_clients() {
  if command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null; then return; fi
  log "installing mosquitto-clients"
  apt_install mosquitto-clients
}

# The Mosquitto broker binary (Debian's mosquitto): tests/it/bridge.rs starts its own on a
# spare port as the upstream of MQTT bridges (never the machine's instance on 1883).
ensure_mosquitto_broker() {
  command -v mosquitto >/dev/null && return
  [ -x /usr/sbin/mosquitto ] && { export PATH="$PATH:/usr/sbin"; return; }
  log "installing mosquitto (the broker binary; its service is not used by the tests)"
  apt_install mosquitto
  [ -x /usr/sbin/mosquitto ] && export PATH="$PATH:/usr/sbin"
}

# The openssl command line tool: tests/it/webhooks_tls.rs makes its CA and certificates with it.
ensure_openssl() {
  command -v openssl >/dev/null && return
  log "installing openssl"
  apt_install openssl
}

# What the build needs besides Rust: a C compiler and make (librdkafka, the Kafka target's
# client, is built from the rdkafka crate's vendored source), OpenSSL's and zlib's headers
# (librdkafka links them), pkg-config.
ensure_build_deps() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  [ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  ((${#missing[@]} == 0)) && return
  log "installing build dependencies: ${missing[*]}"
  apt_install "${missing[@]}"
}

ensure_cargo() {
  command -v cargo >/dev/null && return
  [ -x "$HOME/.cargo/bin/cargo" ] && { export PATH="$HOME/.cargo/bin:$PATH"; return; }
  # Debian's own rustc is older than the crates need; rustup installs the current stable.
  log "installing Rust with rustup (stable, minimal profile)"
  if ! command -v curl >/dev/null; then apt_install curl ca-certificates; fi
  command -v cc >/dev/null || apt_install build-essential
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
    --component rustfmt,clippy || die "could not install Rust; see https://rustup.rs"
  export PATH="$HOME/.cargo/bin:$PATH"
}

# paho-mqtt 2.x for Python, for tests/it/paho.rs. Installed with pip into python3's own
# site-packages when pip allows it; where it refuses (a Debian python3 is "externally managed",
# PEP 668), into a venv under the cargo target dir, which MQGATE_PYTHON then points the test at.
paho_ok() { "$1" -c 'import sys, paho.mqtt as p; sys.exit(int(p.__version__.split(".")[0]) < 2)' 2>/dev/null; }

# pyzmq for tests/it/zmq.rs (the ZeroMQ peer of the zmq target's tests): into the python
# ensure_paho settled on (python3, or its venv through MQGATE_PYTHON).
ensure_pyzmq() {
  local py="${MQGATE_PYTHON:-python3}"
  "$py" -c 'import zmq' 2>/dev/null && return
  log "installing pyzmq (PyPI) for $py"
  "$py" -m pip install --quiet 'pyzmq>=25' || die "could not install pyzmq for $py"
}

# The third-party MQTT-SN client (PyPI `mqtt-sn-12`: mqtt_sn_pub / mqtt_sn_sub) for
# tests/it/mqttsn.rs, for the python ensure_paho settled on (python3, or its venv).
ensure_mqttsn_client() {
  local py="${MQGATE_PYTHON:-python3}"
  "$py" -c 'import mqttsn12' 2>/dev/null && return
  log "installing mqtt-sn-12 (PyPI) for $py"
  "$py" -m pip install --quiet 'mqtt-sn-12==1.0.9' || die "could not install mqtt-sn-12 for $py"
}

ensure_paho() {
  command -v python3 >/dev/null || { log "installing python3"; apt_install python3 python3-venv; }
  if [ -n "${MQGATE_PYTHON:-}" ] && paho_ok "$MQGATE_PYTHON"; then return; fi
  if paho_ok python3; then return; fi
  log "installing paho-mqtt (PyPI) for python3"
  if python3 -m pip install --quiet 'paho-mqtt>=2,<3' 2>/dev/null && paho_ok python3; then return; fi
  local venv="${CARGO_TARGET_DIR:-target}/paho-venv"
  log "pip refused the system python3; installing paho-mqtt into the venv $venv"
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/python" -m pip install --quiet 'paho-mqtt>=2,<3' || die "could not install paho-mqtt into $venv"
  MQGATE_PYTHON="$(cd "$venv" && pwd)/bin/python"
  export MQGATE_PYTHON
}

# Debian's Chromium for tests/it/console.rs (the web console in a headless browser, driven by
# playwright-core; no browser is downloaded).
ensure_chromium() {
  [ -x /usr/bin/chromium ] && return
  log "installing chromium and chromium-driver"
  apt_install chromium chromium-driver
  [ -x /usr/bin/chromium ] || die "chromium did not install /usr/bin/chromium"
}

# node and npm, for the console test's script.
ensure_node() {
  command -v node >/dev/null && command -v npm >/dev/null && return
  log "installing nodejs and npm"
  apt_install nodejs npm
}

# playwright-core from npm into tests/console/node_modules, as package-lock.json pins it
# (never `playwright install`: the browser is Debian's).
ensure_console_deps() {
  ensure_node
  local want have
  want=$(node -p "require('./tests/console/package-lock.json').packages['node_modules/playwright-core'].version")
  have=$(node -p "require('./tests/console/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
  [ -n "$want" ] && [ "$want" = "$have" ] && return
  log "installing the console test's npm packages (tests/console: npm ci)"
  (cd tests/console && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) \
    || die "npm ci failed in tests/console"
}
