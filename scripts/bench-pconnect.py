#!/usr/bin/env python3
"""Persistent CONNECT latency in a cluster: one node per binary (side by side, one run), each
with N MQTT 3.1.1 clients connecting one after another with clean session 0 and staying
connected; time from CONNECT sent to CONNACK read, and the AMQP connections the node then
holds (from RabbitMQ's management-free `rabbitmqctl list_connections`, when readable). The
sessions are ended with a clean connect afterwards.
Usage: scripts/bench-pconnect.py N ROUNDS NAME=BINARY [NAME=BINARY ...]
Needs RabbitMQ on 127.0.0.1:5672 (guest) and curl."""
import os, socket, struct, subprocess, sys, tempfile, time

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def connect_packet(cid, clean):
    cid = cid.encode()
    var = b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0x00]) + struct.pack(">H", 60)
    payload = struct.pack(">H", len(cid)) + cid
    body = var + payload
    return bytes([0x10, len(body)]) + body

def read_connack(s):
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            raise RuntimeError("closed before CONNACK")
        data += chunk
    if data[0] != 0x20 or data[3] != 0:
        raise RuntimeError(f"refused: {data!r}")

def start(name, binary, prefix, d):
    port, admin = free_port(), free_port()
    cfg = os.path.join(d, name + ".yaml")
    with open(cfg, "w") as f:
        f.write(f'mqtt:\n  listen: "127.0.0.1:{port}"\nadmin:\n  listen: "127.0.0.1:{admin}"\n'
                f'amqp:\n  backbone:\n    url: "amqp://guest:guest@127.0.0.1:5672/%2f"\n'
                f'cluster:\n  node_id: {name}\n  broker: backbone\n  prefix: {prefix}\n')
    log = open(os.path.join(d, name + ".log"), "w")
    p = subprocess.Popen([binary, "run", "--config", cfg], stdout=log, stderr=log)
    for _ in range(200):
        if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{admin}/readyz"],
                          capture_output=True).returncode == 0:
            return p, port
        time.sleep(0.1)
    raise SystemExit(f"{name} not ready")

def rabbit_conns():
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "client_properties"],
                             capture_output=True, text=True, timeout=30).stdout
        return sum(1 for l in out.splitlines() if "mqgate/session" in l)
    except Exception:
        return None

def round_(port, n, tag):
    socks, lat = [], []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(connect_packet(f"{tag}-{i}", False))
        read_connack(s)
        lat.append(time.perf_counter() - t0)
        socks.append(s)
    conns = rabbit_conns()
    for s in socks:
        s.close()
    time.sleep(0.5)
    for i in range(n):  # a clean connect ends each session (its queues are deleted)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(connect_packet(f"{tag}-{i}", True)); read_connack(s); s.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    return q(0.5), q(0.99), sum(lat) / len(lat) * 1000, conns

def main():
    n, rounds = int(sys.argv[1]), int(sys.argv[2])
    bins = [a.split("=", 1) for a in sys.argv[3:]]
    d = tempfile.mkdtemp()
    nodes = []
    for name, b in bins:
        p, port = start(name, b, f"bench-pconn-{name}-{os.getpid()}", d)
        nodes.append((name, p, port))
    time.sleep(1)
    print(f"clients={n} rounds={rounds} load: {os.getloadavg()}")
    try:
        for r in range(rounds):
            for name, _, port in nodes:
                p50, p99, mean, conns = round_(port, n, f"pc-{name}-{r}-{os.getpid()}")
                print(f"round {r+1} {name}: CONNACK p50={p50:.1f}ms p99={p99:.1f}ms mean={mean:.1f}ms"
                      f" session connections while {n} connected={conns} load: {os.getloadavg()[0]:.2f}",
                      flush=True)
    finally:
        for _, p, _ in nodes:
            p.terminate(); p.wait()

main()
