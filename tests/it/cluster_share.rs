//! `cluster:` share groups hand on what a member did not finish (issue 16): a share queue's
//! delivery is acknowledged to RabbitMQ only once its member finished it, so what a SIGKILLed
//! node's member held, or what a member that disconnected had not acknowledged, reaches a
//! member on another node; and a member whose queue is full makes the messages wait rather
//! than be dropped. Each test has a cluster of its own (a unique prefix).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, Publish, QoS};

use crate::cluster::{drain, node_config, past_grace, qos, subscribe, v5, NodeProcess};
use crate::support::{gateway, publish_qos1, unique, wait_ready, RawClient, AMQP_URL};

const FILTER: &str = "$share/g/work/#";

/// Takes every PUBLISH `c` gets until it is quiet for `quiet`, acknowledging none.
async fn hold_packets(c: &mut RawClient, quiet: Duration) -> Vec<Publish> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = c.recv_within(quiet).await {
        if let Packet::Publish(p) = p {
            assert_eq!(p.qos, QoS::AtLeastOnce);
            got.push(p);
        }
    }
    got
}

/// [`hold_packets`]: their payloads.
async fn hold(c: &mut RawClient, quiet: Duration) -> Vec<String> {
    let got = hold_packets(c, quiet).await;
    got.iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

/// `mqgate_cluster_share_deliveries_total{event}` of a node.
async fn share_count(app: &mqgate::app::App, event: &str) -> u64 {
    let text = crate::support::metrics(app).await;
    let name = format!("mqgate_cluster_share_deliveries_total{{event=\"{event}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Two ready nodes of a fresh cluster: on a, each subscriber has one message in flight and
/// `queued` in its queue at most; b as usual.
async fn small_a_and_b(queued: usize) -> (mqgate::app::App, mqgate::app::App) {
    let prefix = unique("it-share");
    let limits = format!("mqtt:\n  outbound_queue: {queued}\n  max_inflight_out: 1\n");
    let small = node_config(&prefix, "a", AMQP_URL).replacen("mqtt:\n", &limits, 1);
    let a = gateway(&small).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    for n in [&a, &b] {
        wait_ready(n).await;
    }
    (a, b)
}

/// Publishes `work/1` … `work/n` (payload: the number) at QoS 1, each PUBACKed.
async fn publish_all(publisher: &mut RawClient, n: u16) {
    for i in 1..=n {
        publish_qos1(publisher, &format!("work/{i}"), i, i.to_string().as_bytes()).await;
    }
}

/// Asserts `got` holds each of 1..=n, and more than once only those in `held` (a member
/// received them and did not acknowledge them: QoS 1 allows them again).
fn assert_all_once_but_held(got: &[String], n: u16, held: &[String]) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for p in got {
        *count.entry(p.as_str()).or_default() += 1;
    }
    let expected: BTreeSet<String> = (1..=n).map(|i| i.to_string()).collect();
    let present: BTreeSet<String> = count.keys().map(|k| (*k).to_owned()).collect();
    let missing: Vec<_> = expected.difference(&present).collect();
    assert!(missing.is_empty(), "lost: {missing:?} (held by the member that went: {held:?})");
    assert_eq!(present, expected, "only what was published");
    for (p, k) in count {
        assert!(k == 1 || held.iter().any(|h| h == p), "{p} came {k} times and was not held");
    }
}

#[tokio::test]
async fn what_a_sigkilled_node_s_member_had_not_acknowledged_reaches_a_member_on_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-share");
    let mut a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let mut holder = RawClient::connect(a.mqtt, ProtocolVersion::V5, "holder").await;
    subscribe(&mut holder, FILTER, qos(QoS::AtLeastOnce), None).await;
    let mut taker = RawClient::connect(b.mqtt, ProtocolVersion::V5, "taker").await;
    subscribe(&mut taker, FILTER, qos(QoS::AtLeastOnce), None).await;
    past_grace().await;
    let mut publisher = RawClient::connect(b.mqtt, ProtocolVersion::V5, "pub").await;
    let n = 40u16;
    publish_all(&mut publisher, n).await;
    // A's member takes its share of the group and acknowledges nothing.
    let held = hold(&mut holder, Duration::from_millis(1500)).await;
    let mut got = drain(&mut taker, Duration::from_millis(500)).await;
    assert!(!held.is_empty(), "the member on a got nothing: the test would prove nothing");
    assert!(got.len() < usize::from(n), "b's member got everything before a died: {got:?}");

    // SIGKILL: a's connection to RabbitMQ goes without a word; what it had not acknowledged
    // goes to b's consumer.
    a.child.kill().expect("kill");
    a.child.wait().expect("reap");
    got.extend(drain(&mut taker, Duration::from_secs(3)).await);
    assert_all_once_but_held(&got, n, &held);
}

#[tokio::test]
async fn what_a_member_that_disconnects_had_not_acknowledged_reaches_the_other_member() {
    let prefix = unique("it-share");
    let a = gateway(&node_config(&prefix, "a", AMQP_URL)).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    for n in [&a, &b] {
        wait_ready(n).await;
    }
    let mut leaver = v5(&a, "leaver").await;
    subscribe(&mut leaver, FILTER, qos(QoS::AtLeastOnce), None).await;
    let mut taker = v5(&b, "taker").await;
    subscribe(&mut taker, FILTER, qos(QoS::AtLeastOnce), None).await;
    past_grace().await;
    let mut publisher = v5(&b, "pub").await;
    let n = 40u16;
    publish_all(&mut publisher, n).await;
    let held = hold(&mut leaver, Duration::from_millis(1500)).await;
    let mut got = drain(&mut taker, Duration::from_millis(500)).await;
    assert!(!held.is_empty(), "the member on a got nothing: the test would prove nothing");

    // A clean session ends without PUBACKs: its messages are not lost.
    leaver.send(&Packet::Disconnect(Box::default())).await;
    drop(leaver);
    got.extend(drain(&mut taker, Duration::from_secs(3)).await);
    assert_all_once_but_held(&got, n, &held);
}

#[tokio::test]
async fn a_member_whose_queue_is_full_gets_every_message_later_instead_of_losing_them() {
    // One message in flight and two queued per subscriber on a: the rest wait.
    let (a, b) = small_a_and_b(2).await;
    let mut slow = v5(&a, "slow").await;
    subscribe(&mut slow, FILTER, qos(QoS::AtLeastOnce), None).await;
    past_grace().await;
    let mut publisher = v5(&b, "pub").await;
    let n = 30u16;
    publish_all(&mut publisher, n).await;
    let got = drain(&mut slow, Duration::from_millis(1500)).await;
    assert_all_once_but_held(&got, n, &[]);
    assert!(share_count(&a, "held").await > 0, "the queue never filled: proves nothing");
    let text = crate::support::metrics(&a).await;
    assert!(!text.contains("reason=\"shared_group_full\""), "nothing dropped for a full queue");
}

#[tokio::test]
async fn a_leaver_s_messages_that_no_member_on_its_node_has_room_for_go_back_to_rabbitmq() {
    // A member on a holds one message in flight (all its client sees) and one queued.
    let (a, b) = small_a_and_b(1).await;
    let mut stuck = v5(&a, "stuck").await;
    subscribe(&mut stuck, FILTER, qos(QoS::AtLeastOnce), None).await;
    let mut leaver = v5(&a, "leaver").await;
    subscribe(&mut leaver, FILTER, qos(QoS::AtLeastOnce), None).await;
    let mut taker = v5(&b, "taker").await;
    subscribe(&mut taker, FILTER, qos(QoS::AtLeastOnce), None).await;
    past_grace().await;
    let mut publisher = v5(&b, "pub").await;
    let n = 30u16;
    publish_all(&mut publisher, n).await;
    // Both members on a are full and acknowledge nothing.
    let held = hold(&mut leaver, Duration::from_millis(1000)).await;
    let stuck_got = hold_packets(&mut stuck, Duration::from_millis(300)).await;
    assert_eq!((held.len(), stuck_got.len()), (1, 1), "each member on a has one in flight");
    assert!(share_count(&a, "held").await > 0, "a's members were never full: proves nothing");
    let mut got = drain(&mut taker, Duration::from_millis(500)).await;

    // The leaver goes: the other member on a has no room, so its two deliveries are nacked
    // back to the share queue (not dropped, not waiting on a).
    leaver.send(&Packet::Disconnect(Box::default())).await;
    drop(leaver);
    got.extend(drain(&mut taker, Duration::from_secs(2)).await);
    let returned = share_count(&a, "returned").await;
    assert!((1..=2).contains(&returned), "one nack per delivery the leaver held: {returned}");
    // The stuck member acknowledges at last: what waited on a comes to it.
    for p in &stuck_got {
        stuck.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    got.extend(drain(&mut stuck, Duration::from_millis(1500)).await);
    assert_all_once_but_held(&got, n, &held);
}
