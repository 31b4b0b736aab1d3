//! A buffered MQTT connection: bytes from the socket become [`Packet`]s, packets become bytes.
//!
//! Owns the socket and both buffers; knows nothing of sessions, routing or acknowledgements.
//! Reading is cancel-safe (it may sit in a `select!`); writes are queued into a buffer and
//! flushed in one `write_all`, so a burst of acknowledgements costs one syscall.
//!
//! An idle connection holds no read buffer: while nothing is buffered and reads are small, a
//! read goes into a stack buffer inside `poll` and only what arrived is copied to the heap.
//! Busy connections (reads that fill the buffer) read straight into a growing heap buffer.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::io::poll_read_buf;

use crate::mqtt::codec::{self, DecodeError, EncodeError, Packet, ProtocolVersion};

/// Smallest read size; also the stack buffer of an idle connection's reads.
const READ_MIN: usize = 1024;
/// Largest read size: a busy connection reads this much per syscall. Payloads are sliced out of
/// the read buffer without a copy, so each chunk lives until its last message is done; at 64 KiB
/// the allocator kept handing fresh pages back and forth with the kernel (`clear_page_erms` was
/// 24% of mqgate's samples in the QoS 0 bench), at 16 KiB it is under 3%.
const READ_MAX: usize = 16 * 1024;
/// A write buffer larger than this is given back after a flush, so idle connections stay small.
const WRITE_KEEP: usize = 8 * 1024;

/// One client connection's socket and buffers.
#[derive(Debug)]
pub struct Connection<S> {
    /// The socket (TCP now, TLS later).
    stream: S,
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    /// Encoded packets not yet written.
    wbuf: BytesMut,
    /// Set from the CONNECT; `None` until then.
    version: Option<ProtocolVersion>,
    /// Largest packet we accept (u32: MQTT's own bound, and every connection carries it).
    max_packet_size: u32,
    /// Largest packet the client accepts (MQTT 5 Maximum Packet Size), `u32::MAX` if unset.
    client_max_packet_size: u32,
    /// How much to read next: doubles while reads fill the buffer, halves while they do not,
    /// between `READ_MIN` and `READ_MAX`.
    read_size: u32,
    /// User properties kept per property list (`mqtt.max_user_properties`; `u16::MAX`: all),
    /// see [`codec::decode_capped`]. Fits in the padding after `version`.
    user_property_cap: u16,
}

/// Why a packet could not be queued for writing.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The codec could not encode it.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// It is larger than the client's Maximum Packet Size; it was not queued.
    #[error("packet of {size} bytes exceeds the client's maximum packet size {max}")]
    TooLargeForClient {
        /// Encoded size.
        size: usize,
        /// The client's limit.
        max: u32,
    },
}

impl<S> Connection<S> {
    /// Wraps a freshly accepted socket.
    pub fn new(stream: S, max_packet_size: usize) -> Self {
        Connection {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            version: None,
            max_packet_size: u32::try_from(max_packet_size).unwrap_or(u32::MAX),
            client_max_packet_size: u32::MAX,
            read_size: READ_MIN as u32,
            user_property_cap: u16::MAX,
        }
    }

    /// Fixes the protocol version (after CONNECT) and the client's packet size limit.
    pub fn set_version(&mut self, version: ProtocolVersion, client_max_packet_size: Option<u32>) {
        self.version = Some(version);
        self.client_max_packet_size = client_max_packet_size.unwrap_or(u32::MAX);
    }

    /// The protocol version, once known.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The stream (what the listener learnt of the client: a certificate's name).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The socket, for a connection set aside while quiet (`mqtt/idle.rs`); what is
    /// buffered is dropped (a resting connection has nothing buffered).
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// The client's Maximum Packet Size (`u32::MAX` if unset).
    pub fn client_max_packet_size(&self) -> u32 {
        self.client_max_packet_size
    }

    /// Decodes the next complete packet already in the buffer, if any.
    pub fn decode(&mut self) -> Result<Option<Packet>, DecodeError> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        let cap = match self.user_property_cap {
            u16::MAX => usize::MAX,
            cap => usize::from(cap),
        };
        codec::decode_capped(&mut self.rbuf, self.version, self.max_packet_size as usize, cap)
    }

    /// Decodes at most `max` user properties per property list (and one more, so that the
    /// caller sees a list is over its limit); the rest are stepped over. `u16::MAX`: no limit.
    pub fn cap_user_properties(&mut self, max: u16) {
        self.user_property_cap = max;
    }

    /// True when undecoded bytes are buffered.
    pub fn has_buffered_input(&self) -> bool {
        !self.rbuf.is_empty()
    }

    /// How many undecoded bytes are buffered (a decode's difference is its packet's size).
    pub fn buffered_input(&self) -> usize {
        self.rbuf.len()
    }

    /// Encodes `packet` into the write buffer (nothing is sent until [`flush`](Self::flush)).
    pub fn queue(&mut self, packet: &Packet) -> Result<(), QueueError> {
        let version = self.version.unwrap_or(ProtocolVersion::V311);
        let before = self.wbuf.len();
        let size = codec::encode(packet, version, &mut self.wbuf)?;
        if size as u64 > u64::from(self.client_max_packet_size) {
            self.wbuf.truncate(before);
            return Err(QueueError::TooLargeForClient { size, max: self.client_max_packet_size });
        }
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn pending_write_bytes(&self) -> usize {
        self.wbuf.len()
    }

    /// True when queued bytes wait to be written.
    pub fn has_pending_writes(&self) -> bool {
        !self.wbuf.is_empty()
    }

    /// The same connection (buffers, version, limits) on another stream: a socket accepted
    /// outside tokio's reactor (`session::start_direct`) that needs a task after all.
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<Connection<T>> {
        Ok(Connection {
            stream: f(self.stream)?,
            rbuf: self.rbuf,
            wbuf: self.wbuf,
            version: self.version,
            max_packet_size: self.max_packet_size,
            client_max_packet_size: self.client_max_packet_size,
            read_size: self.read_size,
            user_property_cap: self.user_property_cap,
        })
    }
}

/// A socket accepted outside tokio's reactor (`session::start_direct`): the CONNECT is read
/// and the CONNACK written with plain non-blocking calls, so a connection that goes quiet at
/// once never registers with tokio.
impl Connection<std::net::TcpStream> {
    /// One non-blocking read into the read buffer: `Ok(None)` when nothing is there yet,
    /// `Ok(Some(0))` on a close.
    pub fn read_direct(&mut self) -> io::Result<Option<usize>> {
        use std::io::Read;
        let mut stack = [0u8; READ_MIN];
        match (&self.stream).read(&mut stack) {
            Ok(n) => {
                self.rbuf.extend_from_slice(&stack[..n]);
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes what is queued without waiting: `Ok(true)` when all of it went (a fresh
    /// socket's send buffer is empty, so a CONNACK does), `Ok(false)` when some is left for
    /// a task to write.
    pub fn write_direct(&mut self) -> io::Result<bool> {
        use std::io::Write;
        while !self.wbuf.is_empty() {
            match (&self.stream).write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Nothing kept: a connection that rests holds no buffer.
        self.wbuf = BytesMut::new();
        Ok(true)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Reads more bytes from the socket. `Ok(false)` on a clean close between packets; an
    /// `UnexpectedEof` error when the peer closed in the middle of one. Cancel-safe.
    pub async fn fill(&mut self) -> io::Result<bool> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// [`fill`](Self::fill) as a poll: a session waits for its socket and its other events
    /// in one poll without storing a future for each. Bytes are taken from the socket only in
    /// the poll that returns them.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let read_size = self.read_size as usize;
        let (n, room) = if self.rbuf.is_empty() && read_size == READ_MIN {
            // Quiet: hold no buffer while waiting (payloads split from the old one keep only
            // their own part alive). The read goes to a buffer on this poll's stack and only
            // what came is copied to the heap.
            self.rbuf = BytesMut::new();
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_MIN];
            let mut buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
            self.rbuf.extend_from_slice(buf.filled());
            (buf.filled().len(), READ_MIN)
        } else {
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * read_size {
                // Give a large buffer back once a burst is over.
                self.rbuf = BytesMut::new();
            }
            let spare = self.rbuf.capacity() - self.rbuf.len();
            if spare < read_size / 2 {
                self.rbuf.reserve(read_size);
            }
            let room = self.rbuf.capacity() - self.rbuf.len();
            (ready!(poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf))?, room)
        };
        let read_size = if n == room {
            (read_size * 2).min(READ_MAX)
        } else if n < room / 4 {
            (read_size / 2).max(READ_MIN)
        } else {
            read_size
        };
        // At most READ_MAX: fits.
        self.read_size = read_size as u32;
        if n == 0 {
            if self.rbuf.is_empty() {
                return Poll::Ready(Ok(false));
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-packet",
            )));
        }
        Poll::Ready(Ok(true))
    }

    /// Writes everything queued. Used after [`write_now`](Self::write_now) found the socket
    /// full (the buffer may have been advanced, hiding how large its allocation is, so it is
    /// given back) and on close.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf = BytesMut::new();
        }
        // TLS and WebSocket streams buffer what they were given (a plain socket: no-op).
        self.stream.flush().await
    }

    /// Writes as much of the queue as the socket takes now, without waiting: `Ok(true)` when
    /// everything is written, `Ok(false)` when the socket is full (then `cx` is woken when it
    /// has room, and [`flush`](Self::flush) writes the rest). Most flushes end here, so the
    /// session's future needs no state for a waiting write.
    pub fn write_now(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) if n == self.wbuf.len() => {
                    // All in one write (the usual case): keep a small buffer for the next
                    // packets, give a large one back so that idle connections stay small.
                    if self.wbuf.capacity() > WRITE_KEEP {
                        self.wbuf = BytesMut::new();
                    } else {
                        self.wbuf.clear();
                    }
                    return self.flush_stream(cx);
                }
                Poll::Ready(Ok(n)) => self.wbuf.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        // Written in parts: the advanced buffer no longer shows its allocation's size.
        self.wbuf = BytesMut::new();
        self.flush_stream(cx)
    }

    /// Pushes out what a TLS or WebSocket stream buffered (a plain socket buffers nothing):
    /// `Ok(false)` when it could not all go now, as for a full socket.
    fn flush_stream(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Flushes, then shuts the write side down (best effort, at most a second: the client
    /// may have stopped reading).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{Publish, PublishProperties, QoS};

    fn publish(payload: usize) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 0,
            properties: PublishProperties::none(),
            payload: bytes::Bytes::from(vec![7u8; payload]),
        })
    }

    #[tokio::test]
    async fn a_write_to_a_full_socket_finishes_in_flush_and_gives_the_buffer_back() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = Connection::new(ours, 1 << 20);
        conn.set_version(ProtocolVersion::V311, None);
        conn.queue(&publish(64 * 1024)).expect("queue");
        let expected = conn.wbuf.to_vec();
        let all = poll_fn(|cx| Poll::Ready(conn.write_now(cx))).await.expect("write");
        assert!(!all, "a 64 KiB packet does not fit a 1 KiB pipe at once");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut got).await.map(|_| got)
        });
        conn.flush().await.expect("flush");
        assert_eq!(conn.wbuf.capacity(), 0, "the large buffer is given back after the burst");
        conn.close().await;
        drop(conn);
        assert_eq!(reader.await.expect("reader").expect("read"), expected, "bytes in order");
    }

    #[tokio::test]
    async fn a_write_that_fits_keeps_a_small_buffer_and_drops_a_large_one() {
        let (ours, mut theirs) = tokio::io::duplex(256 * 1024);
        let mut conn = Connection::new(ours, 1 << 20);
        conn.set_version(ProtocolVersion::V311, None);
        conn.queue(&Packet::PingResp).expect("queue");
        assert!(poll_fn(|cx| Poll::Ready(conn.write_now(cx))).await.expect("write"));
        assert!(conn.wbuf.is_empty() && conn.wbuf.capacity() > 0, "a small buffer is kept");
        conn.queue(&publish(64 * 1024)).expect("queue");
        assert!(poll_fn(|cx| Poll::Ready(conn.write_now(cx))).await.expect("write"));
        assert_eq!(conn.wbuf.capacity(), 0, "a large buffer is given back");
        let mut got = vec![0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut theirs, &mut got).await.expect("read");
        assert_eq!(got, [0xD0, 0], "PINGRESP first");
    }
}
