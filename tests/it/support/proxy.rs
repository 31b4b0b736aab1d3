//! A TCP proxy between mqgate and RabbitMQ that a test can pause in one direction or cut, to
//! make a broker "go away" without touching the machine's RabbitMQ.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The real RabbitMQ behind the proxy.
pub const RABBIT_ADDR: &str = "127.0.0.1:5672";

pub struct Proxy {
    pub addr: SocketAddr,
    /// Accept (and forward) new connections while true.
    up: Arc<AtomicBool>,
    /// Live forwarding tasks, aborted by `cut`.
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Holds bytes going to RabbitMQ while true.
    pub pause_to_broker: watch::Sender<bool>,
    /// Holds bytes coming from RabbitMQ while true.
    pub pause_to_client: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let up = Arc::new(AtomicBool::new(true));
        let pumps: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (pause_to_broker, to_broker_rx) = watch::channel(false);
        let (pause_to_client, to_client_rx) = watch::channel(false);
        let (up2, pumps2) = (Arc::clone(&up), Arc::clone(&pumps));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(RABBIT_ADDR).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut pumps = pumps2.lock().expect("pumps");
                pumps.push(tokio::spawn(pump(cr, sw, to_broker_rx.clone())));
                pumps.push(tokio::spawn(pump(sr, cw, to_client_rx.clone())));
            }
        });
        Proxy { addr, up, pumps, pause_to_broker, pause_to_client }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Closes every proxied connection and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for pump in self.pumps.lock().expect("pumps").drain(..) {
            pump.abort();
        }
    }

    pub fn restore(&self) {
        self.pause_to_broker.send_replace(false);
        self.pause_to_client.send_replace(false);
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
