//! The route dry-run (issue 15, item 2): `mqgate route` on a config with AMQP, HTTP and MQTT
//! bridge targets and a `when:` that fails, compared field by field, without a connection to
//! any of them; and `POST /api/v1/route` answering the same on the running gateway.

use std::net::TcpListener;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::webhook::Webhook;
use crate::support::*;

const TOKEN: &str = "route-admin-token-0123456789";

/// A listener nothing should connect to: true when nobody did.
fn untouched(l: &TcpListener) -> bool {
    l.set_nonblocking(true).expect("nonblocking");
    matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A config whose AMQP broker, HTTP endpoint and bridge upstream are `amqp`, `http`, `mqtt`.
fn config(amqp: &str, http: &str, mqtt: &str, phc: &str) -> String {
    format!(
        r#"mqtt:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
  token: "{TOKEN}"
amqp:
  main:
    url: "amqp://guest:guest@{amqp}/%2f"
http:
  hook:
    url: "http://{http}/base"
    headers:
      Authorization: "Bearer very-secret"
bridges:
  cloud:
    url: "mqtt://{mqtt}"
    client_id: "edge-route-test"
users:
  - username: alice
    password_hash: "{phc}"
acl:
  - allow: publish
    user: alice
    topic: "sensors/#"
acl_default: deny
rules:
  - name: events
    from: "sensors/#"
    to:
      - amqp:
          broker: main
          exchange: "ex.{{{{ levels[1] }}}}"
          routing_key: "site.{{{{ user_properties.site }}}}"
      - amqp:
          broker: main
          queue: "jobs.route-test"
          id: jobs
  - name: hot
    from: "sensors/+/temp"
    when: "qos > 0 and json.temp > 30"
    to:
      - amqp:
          broker: main
          exchange: alarms
  - name: hooks
    from: "sensors/+/temp"
    to:
      - http:
          endpoint: hook
          method: PUT
          path: "/devices/{{{{ levels[1] }}}}"
          headers: {{ X-Site: "{{{{ user_properties.site }}}}" }}
          body: '{{"t": {{{{ json.temp }}}}, "by": "{{{{ username }}}}"}}'
  - name: uplink
    from: "sensors/#"
    to:
      - mqtt: {{ bridge: cloud, topic: "edge/{{{{ topic_name }}}}", qos: 1 }}
  - name: elsewhere
    from: "other/#"
    to:
      - amqp: {{ broker: main, exchange: other }}
"#
    )
}

/// `mqgate route` on `path` for alice's QoS 1 temperature message (as `user`).
fn route_cli(path: &std::path::Path, user: &str, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqgate"));
    cmd.args(["route", "--config"]).arg(path).args([
        "--topic",
        "sensors/dev1/temp",
        "--payload",
        r#"{"temp": 12}"#,
        "--qos",
        "1",
        "--user",
        user,
        "--client-id",
        "dev1",
        "--property",
        "site=north",
    ]);
    cmd.args(extra).output().expect("run mqgate route")
}

fn rule<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule"] == name))
        .unwrap_or_else(|| panic!("rule {name} in {report:#}"))
}

#[test]
fn route_cli_resolves_every_target_and_connects_nowhere() {
    let (amqp, http, mqtt) = (
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        TcpListener::bind("127.0.0.1:0").expect("bind"),
    );
    let addr = |l: &TcpListener| l.local_addr().expect("addr").to_string();
    let phc = mqgate::auth::passwd::hash_password(b"pw").expect("hash");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.yaml");
    std::fs::write(&path, config(&addr(&amqp), &addr(&http), &addr(&mqtt), &phc)).expect("write");

    let out = route_cli(&path, "alice", &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(r["topic"], "sensors/dev1/temp");
    assert_eq!((r["qos"].clone(), r["retain"].clone()), (json!(1), json!(false)));
    assert_eq!(r["acl"]["publish_allowed"], true);
    assert_eq!(r["acl"]["user"], "alice");
    assert_eq!(r["routed"], true);
    assert!(r["local_subscribers"].as_str().is_some_and(|s| s.starts_with("not known")));

    let events = rule(&r, "events");
    assert_eq!((events["matches"].clone(), events["applies"].clone()), (json!(true), json!(true)));
    assert_eq!(events["ack"], "sink");
    let t = &events["targets"][0];
    assert_eq!(t["kind"], "amqp");
    assert_eq!(t["id"], "events/amqp:main/ex.{{ levels[1] }}");
    assert_eq!(t["fields"]["broker"], "main");
    assert_eq!(t["fields"]["exchange"], "ex.dev1");
    assert_eq!(t["fields"]["routing_key"], "site.north");
    assert_eq!(t["fields"]["mandatory"], false);
    let q = &events["targets"][1];
    assert_eq!(q["id"], "jobs");
    assert_eq!(q["fields"]["queue"], "jobs.route-test");
    assert_eq!(q["fields"]["exchange"], "");
    assert_eq!(q["fields"]["routing_key"], "jobs.route-test");
    assert_eq!(q["fields"]["mandatory"], true);

    let hot = rule(&r, "hot");
    assert_eq!((hot["matches"].clone(), hot["applies"].clone()), (json!(true), json!(false)));
    assert_eq!(hot["when"]["condition"], "qos > 0 and json.temp > 30");
    assert_eq!(hot["when"]["held"], false);
    assert_eq!(
        hot["when"]["clauses"],
        json!([{"clause": "qos > 0", "held": true}, {"clause": "json.temp > 30", "held": false}])
    );
    assert_eq!(hot["when"]["values"], json!({"json.temp": "12", "qos": "1"}));
    assert_eq!(hot["targets"], json!([]));

    let hooks = rule(&r, "hooks");
    let h = &hooks["targets"][0]["fields"];
    assert_eq!(hooks["targets"][0]["kind"], "http");
    assert_eq!(h["endpoint"], "hook");
    assert_eq!(h["method"], "PUT");
    assert_eq!(h["url"], format!("http://{}/base/devices/dev1", addr(&http)));
    assert_eq!(h["headers"]["x-site"], "north");
    assert_eq!(h["headers"]["authorization"], "(the endpoint's header: not shown)");
    assert_eq!(h["headers"]["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["body"], r#"{"t": 12, "by": "alice"}"#);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("very-secret"), "an endpoint header leaked: {text}");

    let up = &rule(&r, "uplink")["targets"][0];
    assert_eq!(up["kind"], "mqtt");
    assert_eq!(
        up["fields"],
        json!({"bridge": "cloud", "topic": "edge/sensors/dev1/temp", "qos": 1, "retain": false})
    );

    let elsewhere = rule(&r, "elsewhere");
    assert_eq!(
        (elsewhere["matches"].clone(), elsewhere["applies"].clone()),
        (json!(false), json!(false))
    );

    // The ACL for someone else, and the text form.
    let out = route_cli(&path, "bob", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("acl: publish DENIED for user \"bob\""), "{text}");
    assert!(text.contains("\"bob\" is not under users:"), "{text}");
    assert!(text.contains("not routed"), "{text}");
    let out = route_cli(&path, "alice", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "rule \"hot\" (from \"sensors/+/temp\", ack: sink): does not apply",
        "  when: qos > 0 and json.temp > 30: does not hold",
        "    json.temp > 30: false",
        "    json.temp = 12",
        "    exchange: ex.dev1",
        "    routing_key: site.north",
        "    url: http://",
        "    topic: edge/sensors/dev1/temp",
        "rules whose filter does not match: elsewhere (other/#)",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }

    // Nothing was connected to: no AMQP, HTTP or MQTT connection was made.
    for (name, l) in [("amqp", &amqp), ("http", &http), ("mqtt", &mqtt)] {
        assert!(untouched(l), "the dry-run connected to the {name} endpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_api_answers_as_the_cli_does() {
    let webhook = Webhook::ok().await;
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let phc = mqgate::auth::passwd::hash_password(b"pw").expect("hash");
    let yaml = config(
        "127.0.0.1:5672",
        &webhook.addr.to_string(),
        &dead.local_addr().expect("addr").to_string(),
        &phc,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.yaml");
    std::fs::write(&path, &yaml).expect("write");
    let out = route_cli(&path, "alice", &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).expect("JSON");

    let app = gateway(&yaml).await;
    let body = json!({
        "topic": "sensors/dev1/temp", "payload": "{\"temp\": 12}", "qos": 1,
        "user": "alice", "client_id": "dev1",
        "properties": {"user_properties": {"site": "north"}}
    });
    let (status, _, text) =
        post(app.admin_addr, "/api/v1/route", Some(&format!("Bearer {TOKEN}")), &body.to_string())
            .await;
    assert_eq!(status, 200, "{text}");
    let api: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(api, cli, "the API and the CLI differ");
    // Nothing was sent: the webhook saw no request.
    assert!(webhook.seen().is_empty());
    let (status, _, _) = post(app.admin_addr, "/api/v1/route", None, &body.to_string()).await;
    assert_eq!(status, 401, "the dry-run needs the token");
    let (status, _, text) =
        post(app.admin_addr, "/api/v1/route", Some(&format!("Bearer {TOKEN}")), "{\"topic\": 1}")
            .await;
    assert_eq!(status, 400, "{text}");
    app.stop().await;
}
