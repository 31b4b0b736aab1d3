//! `amqps://` with SASL EXTERNAL against a real RabbitMQ: a second node the test starts
//! (`support::rabbit_node`, with `rabbitmq_auth_mechanism_ssl`, a TLS listener that requires
//! client certificates and the certificate's CN as the user name), never the machine's node.
//! The real mqgate binary logs in with its client certificate and forwards QoS 1; a
//! certificate naming no user of the node and one from a CA the node does not trust are
//! refused with the reason in the log and `/readyz`, and nothing is acknowledged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::process::{Child, Command};

use crate::support::certs::{Ca, ClientNames, Pair};
use crate::support::mosquitto::spare_port;
use crate::support::rabbit_node::{NodeTls, RabbitNode};
use crate::support::{exchange_with_queue, get, http_get, unique, RawClient};

/// The real binary on spare ports, its log in a file.
struct Gateway {
    /// Killed on drop.
    child: Child,
    /// The MQTT listener.
    mqtt: SocketAddr,
    /// The admin server.
    admin: SocketAddr,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Gateway {
    /// Starts `mqgate run` with the `amqp:` and `rules:` sections `rest`.
    async fn start(dir: &Path, name: &str, rest: &str) -> Gateway {
        let mqtt = SocketAddr::from(([127, 0, 0, 1], spare_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], spare_port()));
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!("mqtt:\n  listen: \"{mqtt}\"\nadmin:\n  listen: \"{admin}\"\n{rest}"),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mqgate");
        let gw = Gateway { child, mqtt, admin, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(http_get(admin, "/healthz").await, Ok((200, _))) {
            assert!(Instant::now() < deadline, "mqgate did not start:\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/readyz` until its body satisfies `done` (10 s at most); returns status and body.
    async fn readyz_until(&self, done: impl Fn(&str) -> bool) -> (u16, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http_get(self.admin, "/readyz").await.expect("readyz");
            if done(&body) {
                return (status, body);
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never got there: {status} {body}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// An `amqp:` broker `name` on the node's TLS port logging in with `client`'s certificate.
fn external_broker(name: &str, node: &RabbitNode, ca: &Path, client: &Pair) -> String {
    format!(
        "  {name}:\n    url: \"amqps://127.0.0.1:{port}/\"\n    auth_mechanism: external\n    \
         tls:\n      ca: \"{ca}\"\n      cert: \"{cert}\"\n      key: \"{key}\"\n      \
         server_name: localhost\n",
        port = node.amqps_port,
        ca = ca.display(),
        cert = client.cert.display(),
        key = client.key.display(),
    )
}

/// A rule from `filter` to `exchange` on broker `broker`.
fn rule(name: &str, filter: &str, broker: &str, exchange: &str) -> String {
    format!(
        "  - name: {name}\n    from: \"{filter}\"\n    to:\n      - amqp:\n          \
         broker: {broker}\n          exchange: \"{exchange}\"\n"
    )
}

/// `rabbitmqctl list_connections user auth_mechanism ssl`, one `[user, mechanism, ssl]` per
/// connection.
fn connections(node: &RabbitNode) -> Vec<Vec<String>> {
    node.ctl(&["list_connections", "user", "auth_mechanism", "ssl", "-q", "--no-table-headers"])
        .lines()
        .map(|l| l.split('\t').map(|f| f.trim().to_owned()).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_logs_in_as_the_certificate_cn_and_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "node");
    let untrusted_ca = Ca::new(dir.path(), "untrusted");
    let server = ca.server("node-server");
    let user = unique("mqgate-gw");
    let client = ca.client("gw", ClientNames { cn: &user, ..Default::default() });
    let stranger = ca.client("stranger", ClientNames { cn: "nobody-here", ..Default::default() });
    // The right name, from a CA the node does not trust.
    let forged = untrusted_ca.client("forged", ClientNames { cn: &user, ..Default::default() });

    let started = Instant::now();
    let tls = (ca.pem.clone(), server.cert.clone(), server.key.clone());
    let node = tokio::task::spawn_blocking(move || {
        RabbitNode::start(NodeTls { ca: &tls.0, cert: &tls.1, key: &tls.2 })
    })
    .await
    .unwrap();
    eprintln!("RabbitMQ node {} booted in {:?}", node.name, started.elapsed());
    node.add_certificate_user(&user);

    // The test's own view of the node: PLAIN as guest on the plain listener.
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("PLAIN connection to the test's node: {e}\n{}", node.logs()));
    let (ch, exchange, queue) = exchange_with_queue(&conn, "ext.#").await;

    // 1. Logged in by certificate: QoS 1 is acknowledged once the node confirmed it.
    let gw = Gateway::start(
        dir.path(),
        "good",
        &format!(
            "amqp:\n{}rules:\n{}",
            external_broker("node", &node, &ca.pem, &client),
            rule("r1", "ext/#", "node", &exchange)
        ),
    )
    .await;
    let (status, body) = gw.readyz_until(|b| !b.contains("disconnected")).await;
    assert_eq!(status, 200, "{body}\nlog:\n{}", gw.log());
    let mut c = RawClient::connect(gw.mqtt, ProtocolVersion::V5, &unique("ext")).await;
    c.publish("ext/a", QoS::AtLeastOnce, 1, b"by certificate").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}\nlog:\n{}", gw.log()),
    }
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("the message reached the node");
    assert_eq!(d.data, b"by certificate");
    assert_eq!(d.routing_key.as_str(), "ext.a");
    // The node sees mqgate as the certificate's CN, logged in with EXTERNAL over TLS.
    let conns = connections(&node);
    assert!(conns.contains(&vec![user.clone(), "EXTERNAL".into(), "true".into()]), "{conns:?}");
    assert!(gw.log().contains("connected to the AMQP broker"), "{}", gw.log());
    gw.stop().await;

    // 2. A certificate the node trusts whose CN is no user of it, 3. one from a CA it does
    //    not trust, and 4. none at all (PLAIN over TLS): never connected, the reason logged
    //    and in /readyz, nothing acknowledged.
    let no_cert = format!(
        "  nocert:\n    url: \"amqps://guest:guest@127.0.0.1:{}/\"\n    tls:\n      ca: \"{}\"\n      \
         server_name: localhost\n",
        node.amqps_port,
        ca.pem.display()
    );
    let gw = Gateway::start(
        dir.path(),
        "refused",
        &format!(
            "amqp:\n{}{}{no_cert}rules:\n{}{}{}",
            external_broker("stranger", &node, &ca.pem, &stranger),
            external_broker("forged", &node, &ca.pem, &forged),
            rule("r1", "bad/#", "stranger", &exchange),
            rule("r2", "forged/#", "forged", &exchange),
            rule("r3", "nocert/#", "nocert", &exchange),
        ),
    )
    .await;
    let (status, body) = gw
        .readyz_until(|b| {
            ["stranger", "forged", "nocert"]
                .iter()
                .all(|name| b.contains(&format!("amqp {name}: disconnected (")))
        })
        .await;
    eprintln!("/readyz: {status} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(
            "amqp stranger: disconnected (the broker refused the connection: 403 ACCESS_REFUSED - \
             Login was refused using authentication mechanism EXTERNAL"
        ),
        "{body}"
    );
    // TLS 1.3: the node checks the certificate after mqgate's side of the handshake is done
    // and answers the first read with an alert, which reads as the handshake failure it is.
    let forged_refused = "amqp forged: disconnected (TLS handshake with the broker failed: the \
                          broker refused the client certificate: received fatal alert: UnknownCA)";
    assert!(body.contains(forged_refused), "{body}");
    let no_cert_refused = "amqp nocert: disconnected (TLS handshake with the broker failed: the \
                           broker requires a client certificate (tls.cert, tls.key): received \
                           fatal alert: CertificateRequired)";
    assert!(body.contains(no_cert_refused), "{body}");
    let log = gw.log();
    assert!(log.contains("could not connect to the AMQP broker"), "{log}");
    assert!(log.contains("403 ACCESS_REFUSED"), "{log}");
    assert!(log.contains("the broker refused the client certificate"), "{log}");

    // The default ack policy (`ack: sink`) with the broker unreachable: a retryable failure,
    // never a PUBACK. MQTT 5: DISCONNECT 0x89; 3.1.1: the connection is closed.
    for topic in ["bad/x", "forged/x", "nocert/x"] {
        let mut c5 = RawClient::connect(gw.mqtt, ProtocolVersion::V5, &unique("ext5")).await;
        c5.publish(topic, QoS::AtLeastOnce, 1, b"refused").await;
        match c5.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::SERVER_BUSY, "{d:?}"),
            other => panic!("{topic}: expected DISCONNECT 0x89, got {other:?}"),
        }
        let mut c3 = RawClient::connect(gw.mqtt, ProtocolVersion::V311, &unique("ext3")).await;
        c3.publish(topic, QoS::AtLeastOnce, 1, b"refused").await;
        assert!(c3.recv().await.is_none(), "{topic}: 3.1.1 closed without a PUBACK");
    }
    assert!(get(&ch, &queue, Duration::from_millis(300)).await.is_none(), "nothing got through");
    gw.stop().await;
    // The node notices the closed connection on its own time (slower under load): polled.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = connections(&node);
        if left.iter().all(|c| c.first().map(String::as_str) == Some("guest")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only the test's own connection is left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
