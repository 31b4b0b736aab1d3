//! mqgate's own HTTP/1.1 client for plain `http://` endpoints that follow no redirects (the
//! default): a pool of at most `max_connections` keep-alive connections on hyper's low-level
//! client (`hyper::client::conn::http1`), each driven inside the lane task that is using it.
//!
//! Why not reqwest here: per request, reqwest clones its connector and hyper-util client,
//! parses the URL again (twice, once in its redirect layer even with redirects off), merges
//! default headers and hops through hyper-util's pool and a spawned connection task. Profiled
//! in the HTTP bench (`perf record --call-graph dwarf` on mqgate, one message per request),
//! that request layer was about a quarter of mqgate's CPU. A lane here takes an idle
//! connection (or opens one), writes the request, polls the connection and the response in
//! its own task, drains the body and gives the connection back: no extra task, no URL parse.
//!
//! `https://` endpoints (TLS, HTTP/2 by ALPN, custom CA and client certificates) and endpoints
//! with `max_redirects` use reqwest as before (`lane.rs` picks per endpoint).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, HOST, RETRY_AFTER};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::retry::error_chain as chain;

/// One keep-alive connection: the request sender and the connection future that drives it.
pub(super) struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

/// An endpoint's idle connections and how to open more.
pub(super) struct Pool {
    /// `host:port` to connect to.
    addr: String,
    /// The Host header of every request.
    host: HeaderValue,
    /// Idle connections, most recently used last. At most `max_connections` exist in all
    /// (the endpoint's permits bound the ones in use).
    idle: Mutex<Vec<Conn>>,
    /// `connect_timeout`.
    connect_timeout: Duration,
}

/// What an answer was, with the body drained.
pub(super) struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<String>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub(super) enum SendError {
    /// The connection could not be opened (before anything was sent).
    Connect(String),
    /// The request failed on an open connection (written or not).
    Request(String),
}

impl Pool {
    /// A pool for the plain-HTTP origin `host:port`.
    pub(super) fn new(host: &str, port: u16, connect_timeout: Duration) -> Option<Pool> {
        let authority = if port == 80 { host.to_owned() } else { format!("{host}:{port}") };
        Some(Pool {
            addr: format!("{host}:{port}"),
            host: HeaderValue::from_str(&authority).ok()?,
            idle: Mutex::new(Vec::new()),
            connect_timeout,
        })
    }

    /// Sends `req` (origin-form URI) and drains the answer, reading at most `max_drain` body
    /// bytes. Uses an idle connection when one is still open, else opens one. A request that
    /// finds its idle connection closed by the server before it was written goes out once
    /// more on a new connection (it never reached the server).
    pub(super) async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
        max_drain: usize,
    ) -> Result<Answer, SendError> {
        req.headers_mut().insert(HOST, self.host.clone());
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let first = {
            let fut = std::pin::pin!(conn.sender.try_send_request(req));
            drive(&mut conn, fut).await
        };
        let response = match first {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // Never written: the idle connection was gone. Once more, on a new one.
                Some(req) => {
                    conn = self.connect().await?;
                    let fut = std::pin::pin!(conn.sender.send_request(req));
                    drive(&mut conn, fut).await.map_err(|e| SendError::Request(chain(&e)))?
                }
                None => return Err(SendError::Request(chain(e.error()))),
            },
        };
        let status = response.status();
        let retry_after =
            response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let keep_alive = !response
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let mut body = response.into_body();
        let mut read = 0;
        let mut complete = false;
        while read < max_drain {
            let frame = drive(&mut conn, std::pin::pin!(body.frame())).await;
            match frame {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        read += d.len();
                    }
                }
                None => {
                    complete = true;
                    break;
                }
                Some(Err(_)) => break,
            }
        }
        drop(body);
        if complete && keep_alive {
            self.give_back(conn);
        }
        Ok(Answer { status, retry_after })
    }

    /// An idle connection that has not been closed, dropping closed ones.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.pop() {
            // Lets the connection see a close that arrived while it sat idle.
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let done = c.driver.as_mut().poll(&mut cx).is_ready();
            if !done && !c.sender.is_closed() {
                return Some(c);
            }
        }
        None
    }

    /// Puts a connection that finished its exchange back for the next request.
    fn give_back(&self, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
    }

    /// Opens a connection: TCP (no delay) and the HTTP/1.1 handshake.
    async fn connect(&self) -> Result<Conn, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| SendError::Connect("connect timed out".into()))?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(chain(&e)))?;
        Ok(Conn { sender, driver: Box::pin(driver) })
    }
}

/// Polls `fut` to completion while driving `conn` (the connection makes progress only when
/// polled; here it is polled by the lane task that waits on it, so no task of its own).
async fn drive<F: Future + ?Sized>(conn: &mut Conn, mut fut: Pin<&mut F>) -> F::Output {
    let mut driver_done = false;
    poll_fn(|cx| {
        if !driver_done {
            // An ended connection fails the request future; keep polling it for that.
            driver_done = conn.driver.as_mut().poll(cx).is_ready();
        }
        match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(v),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that answers each connection's first request with 200 and then closes it,
    /// without saying `Connection: close`: the idle connection a client keeps is dead.
    async fn one_answer_per_connection() -> (u16, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let mut served = 0;
            while served < 3 {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.expect("read");
                    assert!(n > 0, "client closed before a whole request");
                    got.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&got).to_lowercase();
                assert!(head.contains(&format!("host: 127.0.0.1:{port}")), "{head}");
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .expect("write");
                served += 1;
                drop(s);
            }
            served
        });
        (port, server)
    }

    fn request() -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(b"x")));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = "/p".parse().expect("uri");
        req
    }

    #[tokio::test]
    async fn a_dead_idle_connection_is_replaced_without_failing_the_request() {
        let (port, server) = one_answer_per_connection().await;
        let pool = Pool::new("127.0.0.1", port, Duration::from_secs(2)).expect("pool");
        for i in 0..3 {
            let a =
                pool.send(request(), 1024).await.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
            assert_eq!(a.status, StatusCode::OK);
            // Let the server's close arrive while the connection sits idle.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.await.expect("server"), 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let pool = Pool::new("127.0.0.1", port, Duration::from_secs(2)).expect("pool");
        assert!(matches!(pool.send(request(), 1024).await, Err(SendError::Connect(_))));
    }
}
