"""MQTT 5 features of mqgate driven by paho-mqtt 2.x (a real third-party client).

Usage: python3 tests/it/python/mqtt5_paho.py PORT

Run by tests/paho.rs against a gateway it starts; exits 0 and prints "ALL OK" when every
check passed, non-zero with the failed check otherwise. Checks:
  - a v5 CONNECT with properties (session expiry, receive maximum, request response
    information) and what CONNACK answers (response information, identifiers available);
  - subscription identifiers: two overlapping subscriptions, one copy with both identifiers;
  - user properties, content type, response topic and correlation data passed through;
  - a will with a Will Delay Interval: not before the delay, sent after it.
"""

import queue
import socket
import sys
import threading
import time

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError as e:
    print(
        f"FAIL: paho-mqtt is not installed for {sys.executable} ({e}); "
        "run scripts/test.sh, or: python3 -m pip install paho-mqtt",
        file=sys.stderr,
    )
    sys.exit(2)

HOST = "127.0.0.1"
WAIT = 10.0


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


class Client:
    """A paho client with its network loop in a thread, events turned into queues."""

    def __init__(self, port, client_id, connect_props=None, will=None, clean_start=True):
        self.connack = queue.Queue()
        self.messages = queue.Queue()
        self.subacks = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.c.on_connect = lambda c, u, flags, rc, props: self.connack.put((rc, props))
        self.c.on_message = lambda c, u, msg: self.messages.put(msg)
        self.c.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(rcs)
        if will is not None:
            topic, payload, will_props = will
            self.c.will_set(topic, payload, qos=1, properties=will_props)
        self.c.connect(HOST, port, keepalive=30, clean_start=clean_start, properties=connect_props)
        self.c.loop_start()
        try:
            rc, props = self.connack.get(timeout=WAIT)
        except queue.Empty:
            fail(f"{client_id}: no CONNACK within {WAIT} s")
        check(not rc.is_failure, f"{client_id}: CONNACK refused: {rc}")
        self.connack_props = props

    def subscribe(self, topic, qos, identifier=None):
        props = None
        if identifier is not None:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = identifier
        self.c.subscribe(topic, options=SubscribeOptions(qos=qos), properties=props)
        try:
            rcs = self.subacks.get(timeout=WAIT)
        except queue.Empty:
            fail(f"no SUBACK for {topic}")
        check(all(not rc.is_failure for rc in rcs), f"SUBSCRIBE {topic} refused: {rcs}")

    def next_message(self, what, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            fail(f"no message: {what}")

    def silent(self, seconds, what):
        try:
            msg = self.messages.get(timeout=seconds)
        except queue.Empty:
            return
        fail(f"unexpected message on {msg.topic} ({what})")

    def publish(self, topic, payload, qos=1, props=None):
        info = self.c.publish(topic, payload, qos=qos, properties=props)
        info.wait_for_publish(timeout=WAIT)
        check(info.is_published(), f"PUBLISH {topic} not acknowledged")

    def drop(self):
        """Ends the connection without DISCONNECT (as a device losing power)."""
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def main():
    if len(sys.argv) != 2:
        fail("usage: mqtt5_paho.py PORT")
    port = int(sys.argv[1])
    tag = f"paho{int(time.time() * 1000) % 100000}"
    print(f"paho-mqtt {paho.mqtt.__version__}")

    # A v5 CONNECT with properties.
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 30
    props.ReceiveMaximum = 10
    props.RequestResponseInformation = 1
    sub = Client(port, f"{tag}-sub", connect_props=props)
    info = getattr(sub.connack_props, "ResponseInformation", None)
    check(info == f"mqgate/response/{tag}-sub", f"CONNACK Response Information: {info!r}")
    avail = getattr(sub.connack_props, "SubscriptionIdentifierAvailable", None)
    check(avail == 1, f"CONNACK Subscription Identifier Available: {avail!r}")
    print("ok: v5 connect with properties")

    # Subscription identifiers: one copy carrying both.
    sub.subscribe(f"{tag}/sid/#", 1, identifier=5)
    sub.subscribe(f"{tag}/sid/+/x", 0, identifier=9)
    pub = Client(port, f"{tag}-pub")
    pub.publish(f"{tag}/sid/a/x", b"both")
    msg = sub.next_message("overlapping subscriptions")
    ids = sorted(getattr(msg.properties, "SubscriptionIdentifier", []))
    check(ids == [5, 9], f"subscription identifiers {ids}, want [5, 9]")
    check(msg.qos == 1, f"delivered at QoS {msg.qos}, want the highest granted (1)")
    sub.silent(0.3, "one copy only for overlapping subscriptions")
    print("ok: subscription identifier round trip")

    # User properties, content type, response topic, correlation data.
    sub.subscribe(f"{tag}/props", 1)
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("device", "d1"), ("device", "d2"), ("unit", "°C")]
    p.ContentType = "application/json"
    p.ResponseTopic = f"{tag}/reply"
    p.CorrelationData = b"\x00\x01req"
    pub.publish(f"{tag}/props", b'{"t": 21.5}', props=p)
    msg = sub.next_message("publish with properties")
    got = msg.properties
    check(
        list(getattr(got, "UserProperty", [])) == [("device", "d1"), ("device", "d2"), ("unit", "°C")],
        f"user properties {getattr(got, 'UserProperty', None)}",
    )
    check(getattr(got, "ContentType", None) == "application/json", "content type")
    check(getattr(got, "ResponseTopic", None) == f"{tag}/reply", "response topic")
    check(getattr(got, "CorrelationData", None) == b"\x00\x01req", "correlation data")
    print("ok: user properties, content type, response topic, correlation data")

    # A will with a delay.
    sub.subscribe(f"{tag}/will/#", 1)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.WillDelayInterval = 2
    cp = Properties(PacketTypes.CONNECT)
    cp.SessionExpiryInterval = 60
    dev = Client(port, f"{tag}-dev", connect_props=cp, will=(f"{tag}/will/dev", b"offline", wp))
    dropped = time.monotonic()
    dev.drop()
    sub.silent(1.0, "the will before its 2 s delay")
    msg = sub.next_message("the delayed will", timeout=5.0)
    waited = time.monotonic() - dropped
    check(msg.topic == f"{tag}/will/dev" and msg.payload == b"offline", f"will {msg.topic} {msg.payload!r}")
    check(waited >= 1.8, f"the will came {waited:.2f} s after the drop, before its 2 s delay")
    print(f"ok: will with delay (after {waited:.2f} s)")

    pub.close()
    sub.close()
    print("ALL OK")


if __name__ == "__main__":
    threading.current_thread().name = "paho-test"
    main()
