"""MQTT over WebSocket with a third-party client: paho-mqtt 2.x, transport="websockets".

Usage: python3 tests/it/python/ws_paho.py HOST PORT PATH VERSION [CA_FILE [CERT KEY]]
  VERSION: 311 or 5. With CA_FILE the connection is wss:// (TLS, server verified against it);
  with CERT and KEY the client presents that certificate.
Subscribes to a unique topic, publishes QoS 1 to it on the same connection, and checks that
the message comes back. Prints ALL OK on success; exits non-zero with the reason otherwise.
"""
import sys
import threading
import uuid

import paho.mqtt.client as mqtt

host, port, path, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ca = sys.argv[5] if len(sys.argv) > 5 else None
cert = sys.argv[6] if len(sys.argv) > 6 else None
key = sys.argv[7] if len(sys.argv) > 7 else None

protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id="ws-" + uuid.uuid4().hex[:8],
    protocol=protocol,
    transport="websockets",
)
client.ws_set_options(path=path)
if ca:
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)

topic = "ws/" + uuid.uuid4().hex
connected = threading.Event()
subscribed = threading.Event()
got = threading.Event()
failure = []


def on_connect(c, userdata, flags, reason, properties):
    if reason.is_failure:
        failure.append(f"CONNACK {reason}")
    connected.set()


def on_subscribe(c, userdata, mid, reasons, properties):
    subscribed.set()


def on_message(c, userdata, msg):
    if msg.topic == topic and msg.payload == b"over websocket":
        got.set()


client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port, keepalive=30)
client.loop_start()
try:
    if not connected.wait(10) or failure:
        sys.exit(f"no CONNACK over WebSocket: {failure}")
    client.subscribe(topic, qos=1)
    if not subscribed.wait(10):
        sys.exit("no SUBACK")
    info = client.publish(topic, b"over websocket", qos=1)
    info.wait_for_publish(10)
    if not info.is_published():
        sys.exit("no PUBACK")
    if not got.wait(10):
        sys.exit("the message did not come back")
    print("ALL OK")
finally:
    client.disconnect()
    client.loop_stop()
