//! The bench payload: a 16-byte header (send timestamp, tagged sequence
//! number) followed by filler, and the clock the timestamps are read from.

use std::time::{Duration, Instant};

/// Bytes of header at the start of every payload.
pub const HEADER_LEN: usize = 16;

/// Bits of the sequence field that hold the message's sequence number; the
/// bits above hold the run tag, so stragglers from an earlier run are told
/// apart from duplicates.
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// Largest message count a run can carry.
pub const MAX_MESSAGES: u64 = SEQ_MASK;

/// A monotonic clock shared by every publisher and consumer of the process:
/// timestamps are nanoseconds since one `Instant`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock { epoch: Instant::now() }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The `Instant` that a nanosecond timestamp stands for.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// What the header of a received payload says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub sent_ns: u64,
    pub run_tag: u32,
    pub seq: u64,
}

/// Builds payloads of a fixed size for one run.
#[derive(Clone, Debug)]
pub struct PayloadBuilder {
    len: usize,
    run_tag: u32,
}

impl PayloadBuilder {
    /// `len` must be at least [`HEADER_LEN`] (checked by the CLI).
    pub fn new(len: usize, run_tag: u32) -> Self {
        PayloadBuilder { len: len.max(HEADER_LEN), run_tag }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes one payload for `seq`, stamped `sent_ns`, at the end of `out`.
    pub fn write(&self, out: &mut Vec<u8>, seq: u64, sent_ns: u64) {
        out.extend_from_slice(&sent_ns.to_be_bytes());
        let tagged = (u64::from(self.run_tag) << SEQ_BITS) | (seq & SEQ_MASK);
        out.extend_from_slice(&tagged.to_be_bytes());
        out.resize(out.len() + (self.len - HEADER_LEN), b'x');
    }

    /// A fresh payload for `seq`, stamped `sent_ns`.
    pub fn build(&self, seq: u64, sent_ns: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.write(&mut out, seq, sent_ns);
        out
    }
}

/// Reads the header of a received payload; `None` if it is too short.
pub fn parse(payload: &[u8]) -> Option<Header> {
    let sent: [u8; 8] = payload.get(0..8)?.try_into().ok()?;
    let tagged: [u8; 8] = payload.get(8..16)?.try_into().ok()?;
    let tagged = u64::from_be_bytes(tagged);
    Some(Header {
        sent_ns: u64::from_be_bytes(sent),
        run_tag: u32::try_from(tagged >> SEQ_BITS).unwrap_or(u32::MAX),
        seq: tagged & SEQ_MASK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let b = PayloadBuilder::new(64, 7);
        let p = b.build(123_456, 987_654_321);
        assert_eq!(p.len(), 64);
        assert_eq!(parse(&p), Some(Header { sent_ns: 987_654_321, run_tag: 7, seq: 123_456 }));
        assert_eq!(parse(&p[..15]), None);
    }
}
