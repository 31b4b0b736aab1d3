#!/bin/bash
# Same-node fan-in to one QoS 1 subscriber: a single node vs one cluster node, the subscriber
# with a persistent session (through its session queue in RabbitMQ) and with a clean session.
# Usage: scripts/bench-psessions.sh target/release/mqgate [MESSAGES [ROUNDS [MAX_QUEUED_MESSAGES]]]
# Needs RabbitMQ on 127.0.0.1:5672 (guest), mosquitto_pub/mosquitto_sub, curl, python3.
set -u
BIN=$1; N=${2:-20000}; ROUNDS=${3:-3}; MAXQ=${4:-1000}
DIR=$(mktemp -d)
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PREFIX="bench-psess-$$"
start() { # name cluster(0/1) -> sets PORT PID
  local name=$1 cl=$2; PORT=$(free_port); local admin=$(free_port)
  { printf 'mqtt:\n  max_queued_messages: '$MAXQ'\n  listen: "127.0.0.1:%s"\nadmin:\n  listen: "127.0.0.1:%s"\n' $PORT $admin
    if [ "$cl" = 1 ]; then printf 'amqp:\n  backbone:\n    url: "amqp://guest:guest@127.0.0.1:5672/%%2f"\ncluster:\n  node_id: %s\n  broker: backbone\n  prefix: %s\n' $name $PREFIX; fi
  } > $DIR/$name.yaml
  $BIN run --config $DIR/$name.yaml > $DIR/$name.log 2>&1 & PID=$!
  for i in $(seq 1 100); do curl -sf http://127.0.0.1:$admin/readyz >/dev/null && return; sleep 0.1; done
  echo "not ready: $(cat $DIR/$name.log)"; exit 1
}
run() { # port persistent(0/1) id -> prints seconds
  local port=$1 p=$2 id=$3 flag=""
  [ "$p" = 1 ] && flag="-c"
  mosquitto_sub -p $port -i $id $flag -q 1 -t "fan/#" -C $N -W 120 > /dev/null & local sub=$!
  sleep 0.7
  local t0=$(date +%s.%N)
  seq 1 $N | mosquitto_pub -p $port -i pub-$id -q 1 -t fan/in -l
  wait $sub
  local t1=$(date +%s.%N)
  [ "$p" = 1 ] && mosquitto_pub -p $port -i $id -n -t drop/x   # a clean start ends the session
  python3 -c "print(f'{$N/($t1-$t0):.0f}')"
}
start single 0; SP=$PORT; SPID=$PID
start c1 1; CP=$PORT; CPID=$PID
sleep 2
echo "messages=$N rounds=$ROUNDS load: $(uptime)"
for r in $(seq 1 $ROUNDS); do
  a=$(run $SP 1 s-$r-$$); b=$(run $CP 1 c-$r-$$); c=$(run $CP 0 k-$r-$$)
  echo "round $r msgs/s: single-node persistent=$a cluster persistent(session queue)=$b cluster clean=$c  load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
kill $SPID $CPID; wait 2>/dev/null
rm -rf $DIR
