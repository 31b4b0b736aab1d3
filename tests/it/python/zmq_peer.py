"""The ZeroMQ peer of tests/it/zmq.rs (pyzmq): a SUB that connects to mqgate's PUB socket, or a
PULL that binds for mqgate's PUSH socket to connect to.

    zmq_peer.py sub ENDPOINT PREFIX COUNT   connect, subscribe to PREFIX
    zmq_peer.py pull PORT COUNT             bind tcp://127.0.0.1:PORT (0: any free port)

Prints `ready PORT` once it listens (pull) or has subscribed (sub), then each message as one JSON
list of its frames (UTF-8), and exits after COUNT messages or 30 s without one.
"""
import json
import sys

try:
    import zmq
except ImportError:
    print("FAIL: pyzmq is not installed for " + sys.executable + "; run scripts/test.sh", file=sys.stderr)
    sys.exit(2)

ctx = zmq.Context()
mode = sys.argv[1]
if mode == "sub":
    endpoint, prefix, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    s.connect(endpoint)
    print("ready 0", flush=True)
else:
    port, count = int(sys.argv[2]), int(sys.argv[3])
    s = ctx.socket(zmq.PULL)
    if port == 0:
        port = s.bind_to_random_port("tcp://127.0.0.1")
    else:
        s.bind("tcp://127.0.0.1:%d" % port)
    print("ready %d" % port, flush=True)
s.setsockopt(zmq.RCVTIMEO, 30000)
for _ in range(count):
    try:
        frames = s.recv_multipart()
    except zmq.Again:
        print("FAIL: nothing within 30 s", file=sys.stderr)
        sys.exit(1)
    print(json.dumps([f.decode("utf-8", "replace") for f in frames]), flush=True)
