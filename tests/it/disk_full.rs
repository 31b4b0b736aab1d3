//! The store under a full disk (issue 13, item 8): the gateway's store lives on a small tmpfs
//! this test mounts (it runs as root; without the right to mount, it fails and says so). The
//! disk is filled with a file; a retained QoS 1 PUBLISH (which the broker acknowledges only
//! once it is on disk) then gets no PUBACK and `/readyz` answers 503 naming the store; once
//! the file is removed, the same PUBLISH is acknowledged without any help and `/readyz`
//! answers 200 again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, Publish, QoS};

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("this test mounts a tmpfs and cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (run it as root): mount -t tmpfs -o \
             size={size} tmpfs {}: {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file in `dir` until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    for chunk in [64 * 1024, 4096] {
        let buf = vec![0x5au8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

fn retained(topic: &str, id: u16, payload: &[u8]) -> Packet {
    let mut p: Publish = publish_packet(topic, QoS::AtLeastOnce, id, payload);
    p.retain = true;
    Packet::Publish(p)
}

async fn puback_within(c: &mut RawClient, id: u16, wait: Duration) -> bool {
    match c.recv_within(wait).await {
        Err(()) => false,
        Ok(Some(Packet::PubAck(a))) => {
            assert_eq!(a.packet_id, id);
            assert!(a.code.is_success(), "PUBACK with an error: {a:?}");
            true
        }
        Ok(other) => panic!("expected PUBACK or nothing, got {other:?}"),
    }
}

async fn readyz(app: &mqgate::app::App) -> (u16, String) {
    http_get(app.admin_addr, "/readyz").await.expect("/readyz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledgements_and_writing_resumes_when_space_is_freed() {
    let fs = Tmpfs::mount("4m");
    let store = fs.path().join("store");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\n",
        store.display()
    );
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("full")).await;
    c.send(&retained("full/before", 1, b"fits")).await;
    assert!(puback_within(&mut c, 1, Duration::from_secs(10)).await, "PUBACK with room");
    assert_eq!(readyz(&app).await.0, 200);

    let filler = fill(fs.path());
    let big = vec![b'x'; 256 * 1024];
    c.send(&retained("full/during", 2, &big)).await;
    assert!(
        !puback_within(&mut c, 2, Duration::from_secs(3)).await,
        "a PUBACK for a message the full disk did not take"
    );
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store: not writable"), "{body}");
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_store_writable 0"), "{m}");

    std::fs::remove_file(&filler).expect("free the space");
    assert!(
        puback_within(&mut c, 2, Duration::from_secs(20)).await,
        "no PUBACK after space was freed: writing did not resume"
    );
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_store_writable 1"), "{m}");
    let failures = m
        .lines()
        .find_map(|l| l.strip_prefix("mqgate_store_write_failures_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(failures.is_some_and(|n| n >= 1), "{m}");
    c.send(&retained("full/after", 3, b"fits again")).await;
    assert!(puback_within(&mut c, 3, Duration::from_secs(10)).await, "PUBACK after recovery");
    app.stop().await;
    // What was written after the recovery is in the reopened file.
    let app = gateway_on_store(&yaml).await;
    let mut r = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("reader")).await;
    r.subscribe("full/#", QoS::AtMostOnce).await;
    let mut topics = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = r.recv_within(Duration::from_secs(2)).await {
        topics.push(p.topic.to_string());
    }
    topics.sort();
    assert_eq!(topics, ["full/after", "full/before", "full/during"]);
    app.stop().await;
}
