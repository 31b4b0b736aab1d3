//! MQTT 5 features driven by a third-party client: paho-mqtt 2.x for Python (from PyPI), run
//! as `python3 tests/it/python/mqtt5_paho.py PORT` against a gateway started here. A missing
//! python3 or paho-mqtt fails the test with a message saying how to install it (scripts/test.sh
//! does); nothing is skipped.

use std::time::Duration;

use crate::support::*;
use tokio::process::Command;

const NO_RULES: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n";

#[tokio::test]
async fn paho_mqtt5_client_sees_identifiers_properties_and_a_delayed_will() {
    let app = gateway(NO_RULES).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/python/mqtt5_paho.py");
    let python = std::env::var("MQGATE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let child = Command::new(&python)
        .arg(script)
        .arg(app.mqtt_addr.port().to_string())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(60), child).await {
        Err(_) => panic!("{script} did not finish within 60 s"),
        Ok(Err(e)) => panic!(
            "cannot run `{python}` ({e}): python3 with paho-mqtt 2.x is needed \
             (scripts/test.sh installs it; set MQGATE_PYTHON to use another interpreter)"
        ),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "{script} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    app.stop().await;
}
