//! The web console's JSON routes beyond their shape (tests/it/admin_api.rs checks that):
//! pages follow their cursors to the end without gaps or repeats, searches narrow, a
//! disconnect of a client that is not connected is a 404, and live traces are filtered,
//! sampled, capped at `MAX_TRACES` (429 beyond) and closed when the reader goes away.

use std::time::Duration;

use mqgate::mqtt::codec::{ProtocolVersion, QoS};
use serde_json::Value;

use crate::admin_api::publish_retained;
use crate::support::*;

const TOKEN: &str = "console-api-token-0123456789";

async fn get(app: &mqgate::app::App, path: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("http://{}{path}", app.admin_addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin API");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// Every item of a list, page by page (`limit` 2), and the `count` the first page gave.
async fn all_pages(app: &mqgate::app::App, path: &str, key: &str) -> (Vec<Value>, u64) {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    let mut count = None;
    for _ in 0..20 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let cursor = after
            .as_deref()
            .map(|a| {
                format!(
                    "&after={}",
                    percent_encoding::utf8_percent_encode(a, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .unwrap_or_default();
        let (status, page) = get(app, &format!("{path}{sep}limit=2{cursor}")).await;
        assert_eq!(status, 200, "{page}");
        count.get_or_insert(page["count"].as_u64().expect("count"));
        let got = page[key].as_array().expect("items").clone();
        assert!(got.len() <= 2, "a page holds at most `limit`: {page}");
        items.extend(got);
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return (items, count.unwrap_or(0)),
        }
    }
    panic!("{path}: more than 20 pages");
}

/// The events of a trace stream until `n` came or `wait` passed: (event, data).
async fn events(resp: &mut reqwest::Response, n: usize, wait: Duration) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let Ok(chunk) = tokio::time::timeout_at(deadline, resp.chunk()).await else { break };
        let Some(chunk) = chunk.expect("stream") else { break };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                out.push((name, serde_json::from_str(&data).expect("event data is JSON")));
            }
        }
    }
    out
}

async fn trace(app: &mqgate::app::App, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://{}/api/v1/trace?{query}", app.admin_addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("trace")
}

async fn active_traces(app: &mqgate::app::App) -> u64 {
    get(app, "/api/v1/overview").await.1["traces"]["active"].as_u64().expect("active")
}

#[tokio::test]
async fn pages_searches_and_traces() {
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  sys_interval: 0s\nadmin:\n  listen: \"127.0.0.1:0\"\n  token: \"{TOKEN}\"\n"
    );
    let app = gateway(&yaml).await;
    let mut clients = Vec::new();
    for name in ["pg-c", "pg-a", "pg-e", "pg-b", "pg-d"] {
        let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, name).await;
        c.subscribe(&format!("pg/{name}/#"), QoS::AtLeastOnce).await;
        clients.push(c);
    }
    let _other = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "other").await;

    // Clients: by id, every one once, the search narrowing (case-insensitive).
    let (items, count) = all_pages(&app, "/api/v1/clients?search=PG-", "clients").await;
    let ids: Vec<&str> = items.iter().map(|c| c["client_id"].as_str().expect("id")).collect();
    assert_eq!((ids.as_slice(), count), (&["pg-a", "pg-b", "pg-c", "pg-d", "pg-e"][..], 5));
    assert!(items.iter().all(|c| c["connected"] == true && c["protocol"] == "5.0"));
    let (_, everyone) = get(&app, "/api/v1/clients").await;
    assert_eq!(everyone["count"], 6);

    // Subscriptions: by filter, each with its client.
    let (subs, count) = all_pages(&app, "/api/v1/subscriptions?search=pg/", "subscriptions").await;
    let pairs: Vec<(String, String)> = subs
        .iter()
        .map(|s| {
            (
                s["filter"].as_str().unwrap_or("").into(),
                s["client_id"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = ["pg-a", "pg-b", "pg-c", "pg-d", "pg-e"]
        .iter()
        .map(|n| (format!("pg/{n}/#"), (*n).to_owned()))
        .collect();
    assert_eq!((pairs, count), (want, 5));
    // Share groups' members are listed too.
    clients[0].subscribe("$share/grp/jobs/#", QoS::AtLeastOnce).await;
    let (_, shared) = get(&app, "/api/v1/subscriptions?search=%24share").await;
    assert_eq!(shared["count"], 1, "{shared}");
    assert_eq!(shared["subscriptions"][0]["filter"], "$share/grp/jobs/#");
    assert_eq!(shared["subscriptions"][0]["client_id"], "pg-c");
    let (status, one) = get(&app, "/api/v1/clients/pg-c").await;
    assert_eq!(status, 200);
    let filters: Vec<&str> = one["subscriptions"]
        .as_array()
        .expect("subscriptions")
        .iter()
        .map(|s| s["filter"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(filters, ["$share/grp/jobs/#", "pg/pg-c/#"], "its own, by filter");

    // Retained: by topic, filtered.
    let mut setter = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "setter").await;
    for (i, t) in ["keep/3", "keep/1", "keep/2/x", "other/1", "keep/0"].iter().enumerate() {
        publish_retained(&mut setter, t, 1 + i as u16, t.as_bytes()).await;
    }
    let (kept, _) = all_pages(&app, "/api/v1/retained?filter=keep/%23", "retained").await;
    let topics: Vec<&str> = kept.iter().map(|m| m["topic"].as_str().expect("topic")).collect();
    assert_eq!(topics, ["keep/0", "keep/1", "keep/2/x", "keep/3"]);
    let (status, _) = get(&app, "/api/v1/retained?filter=a/%23/b").await;
    assert_eq!(status, 400, "an invalid filter");

    // A disconnect needs a connection.
    let resp = reqwest::Client::new()
        .delete(format!("http://{}/api/v1/clients/nobody", app.admin_addr))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 404);

    // Traces: filtered and sampled; four at once, no fifth; gone with their reader.
    assert_eq!(active_traces(&app).await, 0);
    let mut all = trace(&app, "filter=tr/%23").await;
    assert_eq!(all.status().as_u16(), 200);
    assert!(all.headers()["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let mut half = trace(&app, "filter=tr/a&sample=2").await;
    let third = trace(&app, "filter=%23").await;
    let fourth = trace(&app, "filter=%23").await;
    assert_eq!(active_traces(&app).await, 4);
    let fifth = trace(&app, "filter=%23").await;
    assert_eq!(fifth.status().as_u16(), 429);
    assert_eq!(trace(&app, "filter=a/%23/b").await.status().as_u16(), 400);
    for (i, topic) in ["tr/a", "tr/b", "tr/a", "x/y", "tr/a", "tr/a"].iter().enumerate() {
        crate::support::publish_qos1(
            &mut setter,
            topic,
            100 + i as u16,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let got = events(&mut all, 5, Duration::from_secs(5)).await;
    let topics: Vec<&str> = got.iter().map(|(_, e)| e["topic"].as_str().unwrap_or("")).collect();
    assert_eq!(topics, ["tr/a", "tr/b", "tr/a", "tr/a", "tr/a"], "tr/# in order, x/y not");
    assert_eq!(got[1].1["payload_preview"], "m1");
    assert_eq!(got[0].1["client_id"], "setter");
    let sampled = events(&mut half, 3, Duration::from_secs(2)).await;
    assert_eq!(sampled.len(), 2, "one in two of the four tr/a: {sampled:?}");
    drop((all, half, third, fourth));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while active_traces(&app).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "traces closed with their readers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
